"""raas_batch: batch generation of long reasoning traces over a RaaS sparse paged KV cache."""

from raas_batch.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    # LLM pulls in torch and transformers; import it lazily so `import raas_batch` stays cheap.
    if name == "LLM":
        from raas_batch.llm import LLM

        return LLM
    raise AttributeError(name)
