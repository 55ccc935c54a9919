"""The decoder shared by the Llama, Mistral, Qwen2 and Qwen3 families, written as plain PyTorch.

Tokens of all sequences in a step are flattened: input_ids [T], positions [T]. Attention goes
through `raas_batch.layers.attention.attend`, which reads the step's metadata (prefill or decode)
and the paged KV cache. transformers supplies only the config and the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raas_batch.layers.attention import attend
from raas_batch.layers.linear import Linear
from raas_batch.layers.norm import RMSNorm
from raas_batch.layers.rotary import RotaryEmbedding


@dataclass
class DecoderSpec:
    """Architecture facts read off a HF config, plus the family's switches."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_positions: int
    tie_word_embeddings: bool
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    mlp_bias: bool = False
    o_bias: bool = False

    @classmethod
    def from_hf(cls, cfg, **family) -> DecoderSpec:
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            max_positions=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            **family,
        )


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_idx: int, rotary: RotaryEmbedding):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        # q, k and v projections fused into one matmul (the loader concatenates the checkpoint's three).
        self.qkv_proj = Linear(spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias)
        self.o_proj = Linear(self.q_size, spec.hidden_size, bias=spec.o_bias)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.rotary = rotary
        self.scale = spec.head_dim**-0.5

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden]; positions: [T]
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        qk_size = self.q_size + self.kv_size
        v = qkv[:, qk_size:].view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        rotary = None  # (module, positions) when q and k go to attend unrotated
        if self.q_norm is None and not self.rotary.uses_kernel(x):
            # q and k side by side, rotated in one pass (fewer ops: what sets CPU decode speed)
            qk = self.rotary.rotate(positions, qkv[:, :qk_size].view(T, self.num_heads + self.num_kv_heads, self.head_dim))
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]  # [T, Hq, D], [T, Hkv, D]
        else:
            q = qkv[:, :self.q_size].view(T, self.num_heads, self.head_dim)
            k = qkv[:, self.q_size:qk_size].view(T, self.num_kv_heads, self.head_dim)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if self.rotary.uses_kernel(x):  # attend rotates them (a decode step: inside its append kernel)
                rotary = (self.rotary, positions)
            else:
                q, k = self.rotary(positions, q, k)
        o = attend(self.layer_idx, q, k, v, self.scale, rotary=rotary)  # [T, Hq, D]
        return self.o_proj(o.reshape(T, self.q_size))


class MLP(nn.Module):
    # The engine sets this to the Triton namespace on CUDA (kernels/silu_mul.py: the activation and the
    # product in one kernel); None runs the torch code, the reference.
    kernels = None

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.gate_up_proj = Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        gate_up = self.gate_up_proj(x)  # [T, 2 * intermediate]
        if self.kernels is not None and gate_up.is_cuda:
            return self.down_proj(self.kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_idx: int, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer_idx, rotary)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None):
        """h: the previous sublayer's output [T, hidden]; residual: the running sum (None before the
        first layer, when h is the embedding). The residual add is fused into the next norm."""
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual


class DecoderForCausalLM(nn.Module):
    """A pre-norm decoder-only transformer; subclasses name the family and its switches."""

    @classmethod
    def family_switches(cls, hf_config) -> dict:
        """Llama and Mistral: `attention_bias` puts biases on q, k, v and o."""
        bias = bool(getattr(hf_config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias}

    def __init__(self, hf_config):
        super().__init__()
        spec = DecoderSpec.from_hf(hf_config, **self.family_switches(hf_config))
        self.spec = spec
        rotary = RotaryEmbedding(hf_config, spec.head_dim, spec.max_positions)
        # (an initial weight given: nn.Embedding's initialiser is not run; the loader fills every weight)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size,
                                         _weight=torch.empty(spec.vocab_size, spec.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(spec, i, rotary) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden [T, hidden]
        h, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        return self.norm(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, fp32: bool = True) -> torch.Tensor:
        """hidden: [B, hidden] -> logits [B, vocab], in fp32, or with fp32=False in the head's own dtype
        (the decode step's sampler upcasts on load: the same tokens without a [B, vocab] fp32 copy)."""
        logits = self.lm_head(hidden)
        return logits.float() if fp32 else logits
