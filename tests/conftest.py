"""Shared fixtures: the embedded model (loaded once) and tiny random-weight checkpoints of every
supported family, saved as local directories (safetensors + tokenizer), as a user's --model would be."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run in the interpreter on machines without a GPU; the variable must be set before
# triton is first imported anywhere in the process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
}


@pytest.fixture(scope="session")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    from raas_batch.models.loader import embedded_gguf_path

    path = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def tiny_config(family: str, vocab_size: int):
    import transformers

    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=False, initializer_range=0.2, **extra,
    )
    cfg.eos_token_id = 2
    return cfg


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_tokenizer):
    """family -> path of a saved random-weight checkpoint (built on first use)."""
    from transformers import AutoModelForCausalLM

    made: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in made:
            torch.manual_seed(1234)
            cfg = tiny_config(family, len(smollm_tokenizer))
            model = AutoModelForCausalLM.from_config(cfg).eval()
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            model.save_pretrained(path)
            smollm_tokenizer.save_pretrained(path)
            made[family] = str(path)
        return made[family]

    return get


@pytest.fixture(scope="session")
def smollm():
    """The embedded model through our API, fp32 on the CPU (loaded once per test session)."""
    from raas_batch import LLM

    return LLM(max_num_seqs=8, device="cpu")


@pytest.fixture(scope="session")
def smollm_hf():
    """transformers' own SmolLM2 model: the reference for parity."""
    from transformers import AutoModelForCausalLM

    from raas_batch.models.loader import embedded_gguf_path

    path = embedded_gguf_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests, as in a CPU actor: on 2 shared cores, torch's default of
    2 threads is many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
