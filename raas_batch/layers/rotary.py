"""Rotary position embeddings (rotate-half convention of Llama / Qwen / Mistral checkpoints).

Keys are rotated once, when they are written, at their absolute position; kept keys are never
re-rotated (the RaaS spec: positions are absolute).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_parameters(hf_config) -> dict:
    """The rope settings of a HF config, for transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x
    (`rope_parameters`)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default") or "default")
    return params


def inv_frequencies(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] (fp32) and the attention scaling factor for a config."""
    params = rope_parameters(hf_config)
    base = float(params["rope_theta"])
    rope_type = params["rope_type"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(params["factor"]), 1.0
    if rope_type == "llama3":
        # Llama 3.1 frequency-dependent scaling (used by DeepSeek-R1-Distill-Llama).
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_len / low, old_len / high
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        return torch.where(middle, blended, scaled), 1.0
    # Other static schemes (yarn, longrope, ...): take the numbers from transformers' table.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        raise ValueError(f"rope type {rope_type!r} is not supported (supported: default, linear, llama3, yarn).")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q [T, Hq, D] and k [T, Hkv, D] at absolute positions [T]."""

    def __init__(self, hf_config, head_dim: int, max_positions: int):
        super().__init__()
        self.inv_freq, self.scaling = inv_frequencies(hf_config, head_dim)
        self.max_positions = max_positions
        self.cos = self.sin = None  # built on the model's device by build()

    def build(self, device) -> None:
        """(Re)build the fp32 cos/sin tables on `device`. They are plain attributes, not buffers, so
        that moving the model to bf16 leaves them in fp32."""
        t = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(t, self.inv_freq.to(device))  # [max_positions, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_positions, D]
        self.cos = emb.cos() * self.scaling
        self.sin = emb.sin() * self.scaling
        # rotate_half(x) * sin == swap_halves(x) * sin_signed, bit for bit (only a sign moves)
        half = self.sin.shape[-1] // 2
        self.sin_signed = torch.cat([-self.sin[:, :half], self.sin[:, half:]], dim=-1)

    def _tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin_signed [T, 1, D] at these positions; every layer of a forward passes the same
        positions tensor, so the lookup is done once per forward."""
        cached = getattr(self, "_last", None)
        if cached is None or cached[0] is not positions:
            cached = (positions, self.cos[positions].unsqueeze(1), self.sin_signed[positions].unsqueeze(1))
            self._last = cached
        return cached[1], cached[2]

    kernels = None  # the Triton namespace on CUDA (kernels/rotary.py, in place, one kernel); set by the engine

    def uses_kernel(self, x: torch.Tensor) -> bool:
        return self.kernels is not None and x.is_cuda

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The torch path: x [T, H, D] (any heads, e.g. q and k side by side) -> rotated copy, computed in
        fp32 as transformers does (x * cos + rotate_half(x) * sin), in x's dtype."""
        if self.cos is None or self.cos.device != x.device:
            self.build(x.device)
        cos, sin_signed = self._tables(positions)  # [T, 1, D]
        xf = x.float()
        out = xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin_signed
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp32 cos / sin tables [max_positions, D] on `device` (the kernels' operands)."""
        if self.cos is None or self.cos.device != device:
            self.build(device)
        return self.cos, self.sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if self.uses_kernel(q):
            return self.kernels.apply_rotary(q, k, *self.tables(q.device), positions)
        return self.rotate(positions, q), self.rotate(positions, k)
