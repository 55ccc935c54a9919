"""Job configuration: one flat dataclass, layered defaults -> YAML (`--config`) -> command-line flags.

Invariants:
- Every field of `JobConfig` is a long flag of `python -m raas_batch` (underscores become hyphens) and
  a key of the YAML file given to `--config`; YAML accepts either spelling (`max-new-tokens` or
  `max_new_tokens`), the resolved config is written with the flag spelling.
- A flag given on the command line always wins over the YAML file, which wins over the defaults.
- Sampling fields left unset (None: `max_new_tokens`, `temperature`, `top_p`, `top_k`) take the
  model's generation_config values, else `FALLBACK_DEFAULTS`, exactly as `LLM.generate` fills an
  unset `SamplingParams`; `with_sampling_defaults` resolves them before the job is fingerprinted, and
  config.yaml records the values used (so a rerun from it is the same job even if the model changes).
- `JobConfig.to_yaml()` of a resolved config, read back with `--config`, reproduces the same job
  (run-control fields `config`, `resume`, `overwrite` are not written).
- Fields that change what the job produces are listed in `OUTPUT_FIELDS`; the manifest fingerprints
  exactly those (plus the input's identity), so changing any of them refuses `--resume`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from raas_batch.sampling_params import FALLBACK_DEFAULTS, SamplingParams


class ConfigError(ValueError):
    """A setting the user gave is invalid; the message is one sentence naming the setting and the fix."""


@dataclass
class JobConfig:
    """Everything a batch job needs. Grouped as in `--help`: data, model and cache, sampling, run."""

    # --- data ---------------------------------------------------------------------------------------
    input: str | None = None  # .parquet file/folder, .arrow/.feather, save_to_disk folder, .jsonl, hf:NAME[:SPLIT]
    output: str | None = None  # output folder
    prompt_column: str = "prompt"  # text prompts; a "messages" column of chat turns is used if "prompt" is absent
    apply_chat_template: bool = True  # a text prompt is sent as one user message through the chat template
    system_prompt: str | None = None  # a system message before every prompt that has none (chat template)
    id_column: str = "id"  # stable row ids; the row number is used when the column is absent
    limit: int | None = None  # only the first N rows
    shard_size: int = 256  # input rows per output shard file
    # --- model and cache ----------------------------------------------------------------------------
    model: str | None = None  # None: the embedded default model
    dtype: str | None = None
    device: str | None = None
    kv_policy: str = "dense"
    kv_budget: int | None = None  # KV tokens kept per sequence (sparse policies)
    page_size: int = 16
    kv_policy_options: dict[str, Any] | None = None  # fields of the policy, e.g. {"pin_prompt": false}
    max_num_seqs: int | str = "auto"  # "auto": from the page pool and the policy (LLM's rule)
    max_model_len: int | None = None  # context cap in tokens (prompt + generated); None: the model's
    gpu_memory_utilization: float = 0.9  # share of the GPU the engine may use (weights + KV pages)
    enforce_eager: bool = False  # no CUDA graphs
    share_prompts: bool = True  # a row's n samples prefill once and share the prompt's pages
    batch_invariant: bool = False  # GPU: a row's tokens do not depend on the batch (shard size, order)
    prefill_cost_steps: float | None = None  # refills in groups (engine/scheduler.py); None: 4 on CUDA, 0 on the CPU
    chat_template_kwargs: dict[str, Any] | None = None
    # --- sampling (None: the model's generation_config, else FALLBACK_DEFAULTS; see SamplingParams) --
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    seed: int | None = None  # base seed; each row gets a stable seed derived from it and the row id
    thinking_budget: int | None = None
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    # --- audit (raas_batch.audit; not fingerprinted: the shards do not depend on it) -------------------
    audit_rows: int = 0  # after the shards, decode N evenly spread rows again with a dense cache and compare
    answer_pattern: str | None = None  # regex of the final answer (group 1 if any); default: last \boxed{}, else last number
    reference_column: str | None = None  # input column of reference answers: the audit reports both accuracies
    # --- run ------------------------------------------------------------------------------------------
    config: str | None = None
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False  # no progress; failures and repairs are still printed
    verify: bool = False  # with resume: read every done shard whole (sha256, rows); alone: the CLI's --verify check
    # --- distributed (Ray; see raas_batch.distributed) ------------------------------------------------
    ray: bool = False  # run on a Ray cluster: one GenerationWorker actor per GPU
    ray_address: str | None = None  # cluster to join (implies ray); None: Ray's default (RAY_ADDRESS, ...)
    num_workers: int | None = None  # actors; None: one per GPU of the cluster (1 on a cluster without GPUs)
    max_attempts: int = 3  # Ray: tries of a shard in one run (worker died or failed) before it is failed

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def validate(self) -> None:
        """Raise ConfigError (one sentence naming the flag and the fix) for an impossible setting."""
        if not self.input:
            raise ConfigError("No input given: pass --input PATH (a .parquet, .arrow, .jsonl file, "
                              "a folder, or hf:NAME[:SPLIT]).")
        if not self.output:
            raise ConfigError("No output folder given: pass --output DIR.")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: pass only one of them.")
        if self.verify and self.overwrite:
            raise ConfigError("--verify checks the job in --output, --overwrite starts it over: pass only one of them.")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ConfigError(f"--system-prompt must be text, got {self.system_prompt!r}.")
        if self.system_prompt and not self.apply_chat_template:
            raise ConfigError("--system-prompt goes through the chat template: drop --no-apply-chat-template "
                              "or --system-prompt.")
        positive = {"shard_size": self.shard_size, "page_size": self.page_size,
                    "max_new_tokens": self.max_new_tokens, "n": self.n}
        for name, value in positive.items():
            if (value is not None or name != "max_new_tokens") and (not _is_int(value) or value < 1):
                raise ConfigError(f"--{_flag(name)} must be a positive integer, got {value!r}.")
        if self.max_num_seqs != "auto" and (not _is_int(self.max_num_seqs) or self.max_num_seqs < 1):
            raise ConfigError(f"--max-num-seqs must be a positive integer or auto, got {self.max_num_seqs!r}.")
        if self.prefill_cost_steps is not None and not self.prefill_cost_steps >= 0:
            raise ConfigError(f"--prefill-cost-steps must be a number >= 0 (0: admit each row at once), got "
                              f"{self.prefill_cost_steps}.")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ConfigError(f"--stop-token-ids must be non-negative token ids, got {self.stop_token_ids!r}.")
        for name in ("num_workers", "max_attempts", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ConfigError(f"--{_flag(name)} must be a positive integer, got {value!r}.")
        for name in ("limit", "kv_budget", "thinking_budget", "seed", "audit_rows"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ConfigError(f"--{_flag(name)} must be a non-negative integer, got {value!r}.")
        if self.answer_pattern is not None:
            try:
                re.compile(self.answer_pattern)
            except (re.error, TypeError) as exc:
                raise ConfigError(f"--answer-pattern {self.answer_pattern!r} is not a valid regular expression "
                                  f"({exc}); pass e.g. 'answer is (\\S+)'.") from None
        if (self.answer_pattern or self.reference_column) and not self.audit_rows:
            raise ConfigError("--answer-pattern and --reference-column set up the audit: add --audit-rows N "
                              "(N > 0) or drop them.")
        if self.temperature is not None and self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}.")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}.")
        for name in ("chat_template_kwargs", "kv_policy_options"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ConfigError(f"--{_flag(name)} must be a JSON object, e.g. '{_JSON_EXAMPLES[name]}'.")

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for SamplingParams (without the per-row seed)."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "n": self.n, "thinking_budget": self.thinking_budget,
                "ignore_eos": self.ignore_eos, "stop": list(self.stop), "stop_token_ids": list(self.stop_token_ids)}

    def with_sampling_defaults(self, generation_defaults: dict) -> JobConfig:
        """A copy whose unset sampling fields hold the values the job will use: the model's
        generation_config (`generation_defaults`), else FALLBACK_DEFAULTS."""
        given = {name: getattr(self, name) for name in FALLBACK_DEFAULTS}
        resolved = SamplingParams(**given).with_defaults(generation_defaults)
        return dataclasses.replace(self, **{name: getattr(resolved, name) for name in FALLBACK_DEFAULTS})

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for LLM(...)."""
        return {"model": self.model, "kv_policy": self.kv_policy, "kv_budget": self.kv_budget,
                "page_size": self.page_size, "max_num_seqs": self.max_num_seqs, "dtype": self.dtype,
                "device": self.device, "chat_template_kwargs": self.chat_template_kwargs,
                "policy_options": self.kv_policy_options, "max_model_len": self.max_model_len,
                "gpu_memory_utilization": self.gpu_memory_utilization, "enforce_eager": self.enforce_eager,
                "share_prompts": self.share_prompts, "batch_invariant": self.batch_invariant,
                "prefill_cost_steps": self.prefill_cost_steps}

    def output_settings(self) -> dict[str, Any]:
        """The settings that change the job's output, keyed by field name (fingerprinted by the manifest)."""
        return {name: _jsonable(getattr(self, name)) for name in OUTPUT_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """The resolved config with flag spellings, without run-control fields."""
        return {_flag(f): _jsonable(getattr(self, f)) for f in self.field_names() if f not in _RUN_CONTROL}

    def to_yaml(self) -> str:
        header = ("# Resolved config of this job (defaults -> --config YAML -> flags).\n"
                  "# Rerun or resume it with: python -m raas_batch --config config.yaml --resume\n")
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


# Fields that do not change the output and are not written to config.yaml.
_RUN_CONTROL = ("config", "resume", "overwrite", "verify", "ray", "ray_address", "num_workers", "max_attempts")

# Fields whose change changes the output (fingerprinted). Not here: output, device, max_num_seqs,
# gpu_memory_utilization, enforce_eager, share_prompts, batch_invariant, prefill_cost_steps, quiet and run control (they change where and how fast, not
# what). page_size is here because sparse policies evict whole pages; max_model_len because it clips
# generation and turns long prompts into error rows.
OUTPUT_FIELDS = ("prompt_column", "apply_chat_template", "system_prompt", "id_column", "limit", "shard_size",
                 "model", "dtype", "kv_policy", "kv_budget", "page_size", "kv_policy_options", "max_model_len",
                 "chat_template_kwargs", "max_new_tokens", "temperature", "top_p", "top_k", "n", "seed",
                 "thinking_budget", "ignore_eos", "stop", "stop_token_ids")

_JSON_EXAMPLES = {"chat_template_kwargs": '{"enable_thinking": true}', "kv_policy_options": '{"pin_prompt": false}'}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def parse_json_object(text: str | dict | None, name: str) -> dict | None:
    """`--chat-template-kwargs` / `--kv-policy-options` accept a JSON object (or, from YAML, a mapping)."""
    if text is None or isinstance(text, dict):
        return text
    example = _JSON_EXAMPLES[name]
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--{_flag(name)} is not valid JSON ({exc.msg}): pass a JSON object such as "
                          f"'{example}'.") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--{_flag(name)} must be a JSON object such as '{example}'.")
    return value


def parse_token_ids(value: Any) -> list[int]:
    """`--stop-token-ids`: "1,2", [1, 2], repeated flags (["1,2", "3"]) or one int -> [1, 2, 3]."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[int] = []
    for item in items:
        parts = item.replace(",", " ").split() if isinstance(item, str) else [item]
        for part in parts:
            if isinstance(part, str) and part.isdigit():
                part = int(part)
            if not _is_int(part) or part < 0:
                raise ConfigError(f"--stop-token-ids must be token ids such as 128001,128009, got {part!r}.")
            out.append(part)
    return out


def load_yaml(path: str) -> dict[str, Any]:
    """Read a --config YAML file into {field_name: value}; unknown keys are refused."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist: check the --config path.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML ({exc}); fix the file.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must be a mapping of option names to values.")
    known = set(JobConfig.field_names()) - {"config"}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"Config file {path} has an unknown key {key!r}; valid keys are the long "
                              f"flags of `python -m raas_batch --help` (e.g. max-new-tokens).")
        out[name] = value
    return out


def resolve(cli_values: dict[str, Any]) -> JobConfig:
    """Layer defaults -> YAML (cli_values['config']) -> explicitly given CLI values, then validate.

    `cli_values` holds only the flags the user actually gave (argparse with SUPPRESS defaults).
    """
    values: dict[str, Any] = {}
    if cli_values.get("config"):
        values.update(load_yaml(cli_values["config"]))
    values.update(cli_values)
    for name in ("chat_template_kwargs", "kv_policy_options"):
        if name in values:
            values[name] = parse_json_object(values[name], name)
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    if values.get("stop_token_ids") is not None:
        values["stop_token_ids"] = parse_token_ids(values["stop_token_ids"])
    cfg = JobConfig(**values)
    _coerce_types(cfg)
    # Local paths are stored absolute so that config.yaml reruns the same job from any folder.
    if isinstance(cfg.input, str) and cfg.input and not cfg.input.startswith("hf:"):
        cfg.input = os.path.abspath(os.path.expanduser(cfg.input))
    if isinstance(cfg.output, str) and cfg.output:
        cfg.output = os.path.abspath(os.path.expanduser(cfg.output))
    cfg.validate()
    return cfg


def _coerce_types(cfg: JobConfig) -> None:
    """YAML may give '0.6' or 1 where a float is meant; coerce numbers, refuse what is not one."""
    for name, kind in (("temperature", float), ("top_p", float), ("gpu_memory_utilization", float),
                       ("prefill_cost_steps", float)):
        value = getattr(cfg, name)
        if value is None:
            continue
        try:
            setattr(cfg, name, kind(value))
        except (TypeError, ValueError):
            raise ConfigError(f"--{_flag(name)} must be a number, got {value!r}.") from None
    for name in ("shard_size", "page_size", "max_num_seqs", "max_new_tokens", "n", "top_k", "limit",
                 "kv_budget", "thinking_budget", "seed", "num_workers", "max_attempts", "max_model_len", "audit_rows"):
        value = getattr(cfg, name)
        if value is None or isinstance(value, bool) or (name == "max_num_seqs" and value == "auto"):
            continue
        if isinstance(value, float) and value.is_integer():
            setattr(cfg, name, int(value))
        elif isinstance(value, str):
            try:
                setattr(cfg, name, int(value))
            except ValueError:
                raise ConfigError(f"--{_flag(name)} must be an integer, got {value!r}.") from None
    for name in ("ignore_eos", "quiet", "resume", "overwrite", "verify", "ray", "enforce_eager", "apply_chat_template",
                 "share_prompts", "batch_invariant"):
        value = getattr(cfg, name)
        if not isinstance(value, bool):
            raise ConfigError(f"{name.replace('_', '-')} must be true or false, got {value!r}.")
