"""RMSNorm as in Llama / Qwen (normalise in fp32, scale in the input dtype), with an optional fused
residual add: `norm(x, residual)` returns (norm(x + residual), x + residual)."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    # The engine sets this to the Triton kernel namespace on CUDA (kernels/rmsnorm.py: one kernel for
    # add + norm); None runs the plain torch code below, the reference for parity with transformers.
    kernels = None

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # x, residual: [..., dim]
        if self.kernels is not None and x.is_cuda:
            shape = x.shape
            flat = x.reshape(-1, shape[-1])
            if residual is None:
                return self.kernels.rms_norm(flat, self.weight, self.eps).view(shape)
            out, residual = self.kernels.rms_norm(flat, self.weight, self.eps, residual.view(-1, shape[-1]))
            return out.view(shape), residual.view(shape)
        if residual is not None:
            residual = x + residual
            x = residual
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * (xf if x.dtype == torch.float32 else xf.to(x.dtype))
        return out if residual is None else (out, residual)
