"""Batched sampling with per-request, batch-invariant randomness.

Each row draws its randomness from a counter-based hash of (its request's seed key, its step,
the vocabulary index), never from a shared generator, so a request's tokens do not depend on what
else is in the batch or in which order rows arrive. Sampling is the exponential race
argmax(p_i / E_i) with E_i ~ Exp(1), which draws token i with probability p_i; top-k / top-p restrict
it to a kept set. The specification is `kernels.reference.sample_tokens`; on CUDA the Triton kernel
`kernels/sample.py` computes the same in one program per row that reads the logits a few times
(no sort, no [B, V] temporaries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raas_batch.kernels.reference import MASK32, hash32


def seed_key(seed: int, sample_idx: int) -> int:
    """The 32-bit stream key of sample `sample_idx` of a request seeded with `seed`."""
    x = torch.tensor([(seed & MASK32) ^ ((seed >> 32) * 0x9E3779B1 & MASK32)], dtype=torch.int64)
    x = hash32(hash32(x) + sample_idx * 0x85EBCA6B)
    return int(x.item())


@dataclass
class SamplingBatch:
    """Per-row settings as device tensors ([B] each)."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_p: torch.Tensor  # float32
    top_k: torch.Tensor  # int64; 0 = off
    keys: torch.Tensor  # int64 stream keys
    steps: torch.Tensor  # int64 tokens generated so far (the counter)


def sample(logits: torch.Tensor, batch: SamplingBatch, ops=None) -> torch.Tensor:
    """logits: [B, V] float32 -> token ids [B] int64, with the kernel namespace's `sample_tokens`
    (the torch reference when ops is None)."""
    if ops is None:
        from raas_batch.kernels import reference as ops
    return ops.sample_tokens(logits, batch.temperature, batch.top_p, batch.top_k, batch.keys, batch.steps)
