"""nn.Linear with a faster CPU form for the few rows of a decode step.

On x86 CPUs with MKL (torch's CPU build), `F.linear(x, W)` for a handful of rows runs at 7-12 GB/s of
weight traffic, while the same product written transposed, `(W @ x^T)^T`, runs at 13-31 GB/s: MKL picks
a better kernel for a tall-skinny right-hand side. With one row the transposed form is fastest on a
duplicated row (two columns). Decode on the CPU is bound by reading the weights, so this is most of
its speed: SmolLM2's weight products per step at batch 1 go from 43 ms to 17 ms, at batch 8 from
55 ms to 40 ms (`python benchmarks/bench_cpu_gemm.py` measures both forms on the model's weights).

The two forms round differently (different accumulation order), as transformers' own batch-1 and
batch-8 products do; greedy parity with transformers is checked by tests/test_parity.py.
Used only for fp32 on the CPU with at most `SMALL_ROWS` rows; everything else is `F.linear`. The gain is
MKL's behaviour on this machine (x86, AVX-512); on another CPU run `benchmarks/bench_cpu_gemm.py` and set
RAAS_BATCH_SMALL_ROWS (0 turns the form off) to what it shows.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# up to this many rows take the transposed form (measured here: it loses at 12 rows)
SMALL_ROWS = int(os.environ.get("RAAS_BATCH_SMALL_ROWS", "8"))


def small_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, in] (M <= SMALL_ROWS), weight [out, in] -> [M, out], as (weight @ x^T)^T."""
    M = x.shape[0]
    cols = (x.expand(2, -1).contiguous() if M == 1 else x).T  # [in, max(M, 2)]
    out = torch.mm(weight, cols) if bias is None else torch.addmm(bias.unsqueeze(1), weight, cols)  # [out, M']
    return out[:, :M].T.contiguous()


class Linear(nn.Linear):
    # The engine sets this to its layer-kernel namespace on CUDA; with batch_invariant its `matmul` (a
    # fixed-tile Triton product, kernels/matmul.py) replaces cuBLAS, whose kernel choice depends on the
    # number of rows.
    kernels = None

    def reset_parameters(self) -> None:
        """nn.Linear's initialiser, skipped on the meta device (models/loader.py builds there, then loads or
        draws every weight): there it does no work, yet its first use costs ~1 s in a fresh process."""
        if not self.weight.is_meta:
            super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        matmul = getattr(self.kernels, "matmul", None)
        if matmul is not None and x.is_cuda:
            return matmul(x, self.weight, self.bias)
        if (x.dim() == 2 and 0 < x.shape[0] <= SMALL_ROWS and x.device.type == "cpu"
                and x.dtype == torch.float32 and self.weight.dtype == torch.float32):
            return small_rows_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
