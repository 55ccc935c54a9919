"""Our own model definitions, one family per file, and the registry that picks one for a HF config."""

from raas_batch.models.llama import LlamaForCausalLM
from raas_batch.models.mistral import MistralForCausalLM
from raas_batch.models.qwen2 import Qwen2ForCausalLM
from raas_batch.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}
_BY_MODEL_TYPE = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM,
                  "qwen3": Qwen3ForCausalLM}


def model_class_for(hf_config, model_name: str):
    """The model class for a HF config; a clear error names the supported architectures."""
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    model_type = getattr(hf_config, "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    found = ", ".join(getattr(hf_config, "architectures", None) or [str(model_type)])
    raise ValueError(
        f"model {model_name!r}: architecture {found} is not supported; raas_batch supports "
        f"{', '.join(MODEL_REGISTRY)} (Llama, Mistral, Qwen2 and Qwen3 families)."
    )
