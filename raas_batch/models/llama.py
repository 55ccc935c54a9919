"""Llama family (Llama 2/3, DeepSeek-R1-Distill-Llama, SmolLM2): the plain shared decoder."""

from raas_batch.models.decoder import DecoderForCausalLM


class LlamaForCausalLM(DecoderForCausalLM):
    pass
