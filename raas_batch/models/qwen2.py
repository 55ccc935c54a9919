"""Qwen2 / Qwen2.5 family (DeepSeek-R1-Distill-Qwen, QwQ, DeepScaleR): biases on q, k and v only."""

from raas_batch.models.decoder import DecoderForCausalLM


class Qwen2ForCausalLM(DecoderForCausalLM):
    @classmethod
    def family_switches(cls, hf_config) -> dict:
        return {"qkv_bias": True, "o_bias": False}
