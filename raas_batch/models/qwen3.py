"""Qwen3 family: per-head RMSNorm on q and k before RoPE; `attention_bias` on q, k, v and o."""

from raas_batch.models.decoder import DecoderForCausalLM


class Qwen3ForCausalLM(DecoderForCausalLM):
    @classmethod
    def family_switches(cls, hf_config) -> dict:
        return {**super().family_switches(hf_config), "qk_norm": True}
