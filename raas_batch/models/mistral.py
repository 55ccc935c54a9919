"""Mistral family: the Llama decoder. A sliding window, when the config has one, is not applied:
the loader warns, since sequences longer than the window would differ from the reference."""

from raas_batch.models.decoder import DecoderForCausalLM


class MistralForCausalLM(DecoderForCausalLM):
    pass
