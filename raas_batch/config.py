"""Job configuration: one flat dataclass, layered defaults -> YAML (`--config`) -> command-line flags.

Invariants:
- Every field of `JobConfig` is a long flag of `python -m raas_batch` (underscores become hyphens) and
  a key of the YAML file given to `--config`; YAML accepts either spelling (`max-new-tokens` or
  `max_new_tokens`), the resolved config is written with the flag spelling.
- A flag given on the command line always wins over the YAML file, which wins over the defaults.
- Sampling defaults are those of `SamplingParams`, so a job without sampling flags samples exactly as
  `LLM.generate` would with `SamplingParams()`.
- `JobConfig.to_yaml()` of a resolved config, read back with `--config`, reproduces the same job
  (run-control fields `config`, `resume`, `overwrite` are not written).
- Fields that change what the job produces are listed in `OUTPUT_FIELDS`; the manifest fingerprints
  exactly those (plus the input's identity), so changing any of them refuses `--resume`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from raas_batch.sampling_params import SamplingParams

_SP_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams)}


class ConfigError(ValueError):
    """A setting the user gave is invalid; the message is one sentence naming the setting and the fix."""


@dataclass
class JobConfig:
    """Everything a batch job needs. Grouped as in `--help`: data, model and cache, sampling, run."""

    # --- data ---------------------------------------------------------------------------------------
    input: str | None = None  # .parquet file/folder, .arrow/.feather, save_to_disk folder, .jsonl, hf:NAME[:SPLIT]
    output: str | None = None  # output folder
    prompt_column: str = "prompt"  # text prompts; a "messages" column of chat turns is used if "prompt" is absent
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
    max_num_seqs: int = 64
    chat_template_kwargs: dict[str, Any] | None = None
    # --- sampling (defaults are SamplingParams') ----------------------------------------------------
    max_new_tokens: int = _SP_DEFAULTS["max_new_tokens"]
    temperature: float = _SP_DEFAULTS["temperature"]
    top_p: float = _SP_DEFAULTS["top_p"]
    top_k: int = _SP_DEFAULTS["top_k"]
    n: int = _SP_DEFAULTS["n"]
    seed: int | None = None  # base seed; each row gets a stable seed derived from it and the row id
    thinking_budget: int | None = None
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    # --- run ------------------------------------------------------------------------------------------
    config: str | None = None
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
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
        positive = {"shard_size": self.shard_size, "page_size": self.page_size,
                    "max_num_seqs": self.max_num_seqs, "max_new_tokens": self.max_new_tokens, "n": self.n}
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{_flag(name)} must be a positive integer, got {value!r}.")
        for name in ("num_workers", "max_attempts"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"--{_flag(name)} must be a positive integer, got {value!r}.")
        for name in ("limit", "kv_budget", "thinking_budget", "seed"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigError(f"--{_flag(name)} must be a non-negative integer, got {value!r}.")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}.")
        if self.chat_template_kwargs is not None and not isinstance(self.chat_template_kwargs, dict):
            raise ConfigError("--chat-template-kwargs must be a JSON object, e.g. '{\"enable_thinking\": true}'.")

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for SamplingParams (without the per-row seed)."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "n": self.n, "thinking_budget": self.thinking_budget,
                "ignore_eos": self.ignore_eos, "stop": list(self.stop)}

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for LLM(...)."""
        return {"model": self.model, "kv_policy": self.kv_policy, "kv_budget": self.kv_budget,
                "page_size": self.page_size, "max_num_seqs": self.max_num_seqs, "dtype": self.dtype,
                "device": self.device, "chat_template_kwargs": self.chat_template_kwargs}

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
_RUN_CONTROL = ("config", "resume", "overwrite", "ray", "ray_address", "num_workers", "max_attempts")

# Fields whose change changes the output (fingerprinted). Not here: output, device, max_num_seqs, quiet
# and run control (they change where and how fast, not what). page_size is here because sparse
# policies evict whole pages.
OUTPUT_FIELDS = ("prompt_column", "id_column", "limit", "shard_size", "model", "dtype", "kv_policy",
                 "kv_budget", "page_size", "chat_template_kwargs", "max_new_tokens", "temperature",
                 "top_p", "top_k", "n", "seed", "thinking_budget", "ignore_eos", "stop")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def parse_json_object(text: str | dict | None, flag: str) -> dict | None:
    """`--chat-template-kwargs` accepts a JSON object (or, from YAML, a mapping)."""
    if text is None or isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--{flag} is not valid JSON ({exc.msg}): pass a JSON object such as "
                          "'{\"enable_thinking\": true}'.") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--{flag} must be a JSON object such as '{{\"enable_thinking\": true}}'.")
    return value


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
    if "chat_template_kwargs" in values:
        values["chat_template_kwargs"] = parse_json_object(values["chat_template_kwargs"],
                                                           "chat-template-kwargs")
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
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
    for name, kind in (("temperature", float), ("top_p", float)):
        value = getattr(cfg, name)
        try:
            setattr(cfg, name, kind(value))
        except (TypeError, ValueError):
            raise ConfigError(f"--{_flag(name)} must be a number, got {value!r}.") from None
    for name in ("shard_size", "page_size", "max_num_seqs", "max_new_tokens", "n", "top_k", "limit",
                 "kv_budget", "thinking_budget", "seed", "num_workers", "max_attempts"):
        value = getattr(cfg, name)
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, float) and value.is_integer():
            setattr(cfg, name, int(value))
        elif isinstance(value, str):
            try:
                setattr(cfg, name, int(value))
            except ValueError:
                raise ConfigError(f"--{_flag(name)} must be an integer, got {value!r}.") from None
    for name in ("ignore_eos", "quiet", "resume", "overwrite", "ray"):
        value = getattr(cfg, name)
        if not isinstance(value, bool):
            raise ConfigError(f"{name.replace('_', '-')} must be true or false, got {value!r}.")
