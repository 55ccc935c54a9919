"""The sampling defaults a model ships in its `generation_config.json` (e.g. temperature 0.6 and
top_p 0.95 for DeepSeek-R1 distills), read without loading the model.

vLLM applies these to the sampling fields a request leaves unset; so do `LLM` (unset `SamplingParams`
fields) and batch jobs (sampling flags not given; the values used are written to config.yaml).

Invariants:
- Only keys present in the file count (transformers' own class defaults, e.g. top_k 50, do not).
- The embedded GGUF model, a `.gguf` file and random weights have no generation config: {}.
- A hub id is read from the local cache when it is there, else fetched (the file alone, not weights).
- Keys vLLM would also apply that we do not sample with (`repetition_penalty`, `min_p`) are named in one warning
  when the file sets them to anything but their neutral value, so outputs that differ from vLLM's are explained.
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)

# generation_config.json key -> SamplingParams field
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "max_new_tokens": "max_new_tokens"}
FILE_NAME = "generation_config.json"
# generation_config.json keys vLLM applies by default that raas_batch does not -> their neutral value
NOT_APPLIED = {"repetition_penalty": 1.0, "min_p": 0.0}


def read_generation_defaults(model: str | None) -> dict:
    """{SamplingParams field: value} from `model`'s generation_config.json; {} when it has none."""
    path = _find(model)
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s (%s): sampling defaults are raas_batch's own", path, exc)
        return {}
    if not isinstance(data, dict):
        log.warning("ignoring %s (not a JSON object): sampling defaults are raas_batch's own", path)
        return {}
    skipped = not_applied(data)
    if skipped:
        log.warning("%s sets %s, which raas_batch does not apply (vLLM would): rows sample without %s",
                    path, ", ".join(f"{k}={v}" for k, v in skipped.items()), "it" if len(skipped) == 1 else "them")
    return {ours: data[key] for key, ours in _FIELDS.items() if data.get(key) is not None}


def not_applied(data: dict) -> dict:
    """The keys of a generation_config mapping that vLLM would sample with and raas_batch does not, where the value
    is not the neutral one (`NOT_APPLIED`): {key: value}."""
    return {key: data[key] for key, neutral in NOT_APPLIED.items()
            if data.get(key) is not None and data[key] != neutral}


def _find(model: str | None) -> str | None:
    if model is None or model.endswith(".gguf"):
        return None
    if os.path.isdir(model):
        path = os.path.join(model, FILE_NAME)
        return path if os.path.exists(path) else None
    if os.path.exists(model) or model.startswith((".", "/")):
        return None  # not a hub id; the model loader names the problem
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    cached = try_to_load_from_cache(model, FILE_NAME)
    if cached is not None:  # a path, or the cache's note that the repo has no such file
        return cached if isinstance(cached, str) else None
    try:
        return hf_hub_download(model, FILE_NAME)
    except EntryNotFoundError:  # the model ships none
        return None
    except Exception as exc:  # noqa: BLE001 - offline, gated, unknown repo: the model load says more
        log.warning("could not read %s of %s (%s: %s); sampling settings not given use raas_batch's defaults",
                    FILE_NAME, model, type(exc).__name__, exc)
        return None
