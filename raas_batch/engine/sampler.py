"""Batched sampling with per-request, batch-invariant randomness.

Each row draws its randomness from a counter-based hash of (its request's seed key, its step,
the vocabulary index), never from a shared generator, so a request's tokens do not depend on what
else is in the batch or in which order rows arrive. Sampling is the exponential race
argmax(p_i / E_i) with E_i ~ Exp(1), which draws token i with probability p_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors (values kept in [0, 2^32)); wrapping products keep
    the low 32 bits exact."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def seed_key(seed: int, sample_idx: int) -> int:
    """The 32-bit stream key of sample `sample_idx` of a request seeded with `seed`."""
    x = torch.tensor([(seed & _MASK32) ^ ((seed >> 32) * 0x9E3779B1 & _MASK32)], dtype=torch.int64)
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
    any_sampling: bool
    any_filter: bool


def uniform_noise(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B] keys and steps -> [B, vocab] float32 uniforms in (0, 1), a pure function of its inputs."""
    base = hash32(keys ^ hash32(steps * 0x27D4EB2F + 0x165667B1))  # [B]
    idx = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    h = hash32(base.unsqueeze(1) + idx.unsqueeze(0) * 0x9E3779B9)  # [B, V]
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits: [B, V] float32 -> token ids [B] int64."""
    greedy = logits.argmax(dim=-1)
    if not batch.any_sampling:
        return greedy
    temp = batch.temperature.clamp(min=1e-5).unsqueeze(1)
    probs = torch.softmax(logits / temp, dim=-1)  # [B, V]
    if batch.any_filter:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(probs.shape[1], device=probs.device).unsqueeze(0)
        k = torch.where(batch.top_k > 0, batch.top_k, probs.shape[1]).unsqueeze(1)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly before each token
        drop = (rank >= k) | (before >= batch.top_p.unsqueeze(1))
        drop[:, 0] = False  # always keep the most likely token
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
    exp_noise = -torch.log(uniform_noise(batch.keys, batch.steps, probs.shape[1]))
    sampled = (probs / exp_noise).argmax(dim=-1)
    return torch.where(batch.temperature > 0, sampled, greedy)
