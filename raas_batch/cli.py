"""`python -m raas_batch --input PATH --output DIR [options]`: run a batch generation job.

Flags use vLLM's spellings where vLLM has one. Every flag defaults to "not given" (argparse SUPPRESS)
so that `config.resolve` can layer defaults -> `--config` YAML -> flags given on the command line.

Exit status: 0 the job is complete (rows that could not run are error rows, not failures);
1 some shard failed (rerun with --resume); 2 the job could not start (one sentence on stderr,
nothing written); 130 interrupted. `--verify --output DIR`: 0 every sample is there exactly once,
1 something is missing or damaged (the report says what and the command that repairs it), 2 no job there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from raas_batch.config import ConfigError, JobConfig, load_yaml, resolve
from raas_batch.sampling_params import FALLBACK_DEFAULTS

_DEFAULTS = JobConfig()


def _d(name: str) -> str:
    value = getattr(_DEFAULTS, name)
    return f" (default: {value})" if value not in (None, [], False) else ""


def _fallback(name: str) -> str:
    return f" (default: the model's generation_config, else {FALLBACK_DEFAULTS[name]})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raas_batch", argument_default=argparse.SUPPRESS,
        description="Generate completions for every row of a dataset into resumable Parquet shards.",
        epilog="Outputs: DIR/shards/part-*.parquet (one row per sample; every input column is carried, a "
               "name taken by an output column as input_<name>, e.g. input_answer), DIR/manifest.json, "
               "DIR/config.yaml, DIR/summary.json, and with --audit-rows DIR/audit.parquet. "
               "Exit status: 0 complete, 1 some shard failed (rerun with --resume), 2 bad input or "
               "settings (nothing written), 130 interrupted.")
    data = p.add_argument_group("data")
    data.add_argument("--input", metavar="PATH",
                      help="a .parquet file or folder of them, an Arrow IPC file (.arrow/.feather), a "
                           "datasets save_to_disk folder, a .jsonl file, or hf:NAME[:SPLIT] "
                           "(hf:NAME:CONFIG:SPLIT for a named config)")
    data.add_argument("--output", metavar="DIR", help="output folder")
    data.add_argument("--prompt-column", metavar="NAME",
                      help="column of text prompts or of chat messages (lists of {role, content}); "
                           "'messages' is used when 'prompt' is absent" + _d("prompt_column"))
    data.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction,
                      help="send a text prompt as one user message through the model's chat template, when it "
                           "has one (default: apply; --no-apply-chat-template sends the text as it is)")
    data.add_argument("--system-prompt", metavar="TEXT",
                      help="a system message put before every prompt that has none (needs the chat template)")
    data.add_argument("--id-column", metavar="NAME",
                      help="column of stable row ids; row numbers are used when it is absent" + _d("id_column"))
    data.add_argument("--limit", type=int, metavar="N", help="only the first N rows")
    data.add_argument("--shard-size", type=int, metavar="ROWS",
                      help="input rows per output shard file" + _d("shard_size"))
    model = p.add_argument_group("model and KV cache")
    model.add_argument("--model", help="model name or path (default: the embedded default model)")
    model.add_argument("--dtype", help="model dtype, e.g. bfloat16, float16, float32 (default: engine's choice)")
    model.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: engine's choice)")
    model.add_argument("--kv-policy", metavar="NAME",
                       help="KV cache policy: dense, raas, raas-mass, raas-paper, quest, h2o, streaming" + _d("kv_policy"))
    model.add_argument("--kv-budget", type=int, metavar="TOKENS",
                       help="KV tokens kept per sequence by a sparse policy")
    model.add_argument("--page-size", type=int, metavar="TOKENS", help="tokens per KV page" + _d("page_size"))
    model.add_argument("--kv-policy-options", metavar="JSON",
                       help="options of the KV policy (its dataclass fields), e.g. '{\"pin_prompt\": false}'")
    model.add_argument("--max-num-seqs", metavar="N|auto",
                       help="sequences decoded together; auto: on a GPU, as many as the KV page pool holds at "
                            "the policy's budget (at most the largest CUDA-graph batch, 1024) for a bounded "
                            "policy, else 256; 8 on the CPU" + _d("max_num_seqs"))
    model.add_argument("--max-model-len", type=int, metavar="TOKENS",
                       help="context cap (prompt + generated tokens); longer prompts are error rows "
                            "(default: the model's context)")
    model.add_argument("--gpu-memory-utilization", type=float, metavar="FRACTION",
                       help="share of the GPU's memory the engine may use (weights + KV pages)"
                            + _d("gpu_memory_utilization"))
    model.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction,
                       help="run decode steps eagerly instead of as CUDA graphs")
    model.add_argument("--share-prompts", action=argparse.BooleanOptionalAction,
                       help="a row's --n samples prefill the prompt once and read its pages from one copy "
                            "where the KV policy allows (vLLM's prefix caching for one row)" + _d("share_prompts"))
    model.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction,
                       help="on the GPU, each row's tokens do not depend on what else is in the batch (shard size, "
                            "order, number of GPUs): products and attention whose reduction order depends only on the "
                            "weights and the row; about 7%% (dense) to 12%% (raas) fewer tokens/s on an H200")
    model.add_argument("--prefill-cost-steps", type=float, metavar="STEPS",
                       help="while rows decode, admit waiting rows in groups, once the slots left empty since the "
                            "last prefill add up to this many full decode steps (about what a prefill step costs); "
                            "0 admits each row as soon as a slot frees (default: 4 on a GPU, 0 on the CPU)")
    model.add_argument("--chat-template-kwargs", metavar="JSON",
                       help="extra arguments of the chat template, e.g. '{\"enable_thinking\": true}'")
    sampling = p.add_argument_group(
        "sampling", "--max-new-tokens, --temperature, --top-p and --top-k not given take the model's "
                    "generation_config.json values (as vLLM does), else the defaults shown; config.yaml "
                    "records the values used")
    sampling.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, metavar="N",
                          help="tokens generated per sample" + _fallback("max_new_tokens"))
    sampling.add_argument("--temperature", type=float, help="0 is greedy" + _fallback("temperature"))
    sampling.add_argument("--top-p", type=float, help="nucleus sampling mass" + _fallback("top_p"))
    sampling.add_argument("--top-k", type=int,
                          help="sample among the k likeliest tokens; 0 disables it" + _fallback("top_k"))
    sampling.add_argument("--n", type=int, help="samples per row" + _d("n"))
    sampling.add_argument("--seed", type=int,
                          help="base seed: each row samples with a seed derived from it and the row id")
    sampling.add_argument("--thinking-budget", type=int, metavar="TOKENS",
                          help="at most this many tokens inside <think>...</think>")
    sampling.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction,
                          help="keep generating after EOS (--no-ignore-eos overrides a YAML true)")
    sampling.add_argument("--stop", action="append", metavar="TEXT",
                          help="stop string (repeat the flag for several)")
    sampling.add_argument("--stop-token-ids", action="append", metavar="IDS",
                          help="token ids that end a sample, comma-separated (e.g. 128001,128009; repeatable)")
    audit = p.add_argument_group(
        "fidelity audit", "after the shards, N rows spread evenly over the input are decoded again with a dense "
                          "KV cache (same prompts, seeds and sampling) and both outputs are scored teacher-forced "
                          "under dense and the job's policy: DIR/audit.parquet and summary.json's \"audit\"")
    audit.add_argument("--audit-rows", type=int, metavar="N", help="rows to audit; 0 = no audit" + _d("audit_rows"))
    audit.add_argument("--answer-pattern", metavar="REGEX",
                       help="regular expression of a completion's final answer (its first group if it has one; "
                            "default: the last \\boxed{...}, else the last number of the answer part)")
    audit.add_argument("--reference-column", metavar="NAME",
                       help="input column of reference answers: the audit reports the accuracy of both outputs")
    run = p.add_argument_group("run")
    run.add_argument("--config", metavar="FILE.yaml",
                     help="YAML file with the same keys as the long flags; flags given here win")
    run.add_argument("--resume", action="store_true",
                     help="continue the job in --output: skip done shards, redo the rest")
    run.add_argument("--overwrite", action="store_true", help="start the job in --output over")
    run.add_argument("--quiet", action=argparse.BooleanOptionalAction,
                     help="no progress bar or progress lines (failures and repairs are still printed)")
    run.add_argument("--verify", action="store_true",
                     help="alone (--verify --output DIR): check a job's folder without the input or the model, print "
                          "what is missing or damaged, exit 0 only if every sample is there exactly once; with "
                          "--resume: also read every done shard whole (sha256, rows) before resuming, not only "
                          "its size and footer")
    dist = p.add_argument_group("distributed (Ray)")
    dist.add_argument("--ray", action=argparse.BooleanOptionalAction,
                      help="run on a Ray cluster: one GenerationWorker actor per GPU pulling shards; same "
                           "output layout as a local run, so --resume works across both")
    dist.add_argument("--ray-address", metavar="ADDR",
                      help="Ray cluster to join (implies --ray), e.g. 10.0.0.1:6379, auto, or local for a "
                           "fresh one-machine cluster (default: RAY_ADDRESS or Ray's own default)")
    dist.add_argument("--num-workers", type=int, metavar="N",
                      help="actors (default: one per GPU of the cluster, 1 on a cluster without GPUs)")
    dist.add_argument("--max-attempts", type=int, metavar="N",
                      help="Ray: tries of a shard in one run before it is marked failed" + _d("max_attempts"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verify", False) and not getattr(args, "resume", False):
        return _verify(args)
    try:
        cfg = resolve(vars(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TypeError as exc:  # an unexpected key type from YAML
        print(f"error: invalid configuration ({exc}); check --config.", file=sys.stderr)
        return 2
    from raas_batch.job import JobError
    from raas_batch.runner import run_job

    if cfg.ray or cfg.ray_address:
        from raas_batch.distributed.driver import run_job_ray as run_job
    try:
        summary = run_job(cfg)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun with --resume to continue.", file=sys.stderr)
        return 130
    if not cfg.quiet or not summary["complete"]:  # quiet silences progress, not failures
        print(_final_line(summary, cfg), file=sys.stderr)
    return 0 if summary["complete"] else 1


def _verify(args: argparse.Namespace) -> int:
    """`--verify --output DIR` (or --config DIR/config.yaml): the read-only check of raas_batch.integrity;
    the report on stdout; exit 0 every sample there once, 1 something missing or damaged, 2 no job there."""
    from raas_batch.integrity import verify_folder

    if getattr(args, "overwrite", False):
        print("error: --verify checks the job in --output, --overwrite starts it over: pass only one of them.",
              file=sys.stderr)
        return 2
    output = getattr(args, "output", None)
    if output is None and getattr(args, "config", None):
        try:
            output = load_yaml(args.config).get("output")
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if not output:
        print("error: --verify needs the job's folder: pass --output DIR.", file=sys.stderr)
        return 2
    try:
        report = verify_folder(os.path.abspath(os.path.expanduser(str(output))))
    except FileNotFoundError:
        print(f"error: {output} holds no raas_batch job (no manifest.json): check --output.", file=sys.stderr)
        return 2
    print(report.text())
    return 0 if report.ok else 1


def _final_line(summary: dict, cfg: JobConfig) -> str:
    s = summary
    text = (f"{s['rows']}/{s['rows_total']} rows, {s['samples']} samples, {s['errors']} errors, "
            f"{s['completion_tokens']} tokens, {s['tokens_per_s']:.1f} tok/s this run "
            f"({s['this_run']['wall_time_s']:.1f}s) -> {cfg.output}")
    if s.get("this_run", {}).get("retries"):
        text += f"; {s['this_run']['retries']} shard retries"
    if not s["complete"]:
        text += (f"; {s['shards']['total'] - s['shards']['done']} shard(s) not done: rerun with --resume. "
                 f"Shard states: {json.dumps(s['shards'])}")
        failed = s.get("failed_shards") or []
        if failed:
            text += "; failed: " + "; ".join(f"shard {f['index']} (rows {f['rows'][0]}-{f['rows'][1] - 1}): "
                                             f"{f['error']}" for f in failed[:10])
            if len(failed) > 10:
                text += f"; and {len(failed) - 10} more (see manifest.json)"
    return text


if __name__ == "__main__":
    sys.exit(main())
