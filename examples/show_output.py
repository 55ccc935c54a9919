"""Print a readable view of a raas_batch output folder.

    python examples/show_output.py demo_out [--rows 4] [--chars 240]

For a few rows: the question, an excerpt of the reasoning, the answer, the finish reason and token
counts; when the job's input has an `answer` column (as examples/gsm8k_mini.jsonl does; the output
carries it as `input_answer`), the reference answer and whether the last number of the completion
matches it. Then the job summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap

import pyarrow.parquet as pq

_NUMBER = re.compile(r"(?<!\w)-?\d[\d,]*(?:\.\d+)?")


def _question(prompt: str | None) -> str:
    """The last user turn of a messages prompt, or the prompt text itself."""
    if not prompt:
        return "(none)"
    try:
        messages = json.loads(prompt)
    except ValueError:
        return prompt
    if isinstance(messages, list):
        users = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return users[-1]
    return prompt


def _excerpt(text: str | None, chars: int) -> str:
    text = " ".join((text or "").split())
    if not text:
        return "(empty)"
    return text if len(text) <= chars else text[:chars].rstrip() + " ..."


def _last_number(text: str | None) -> str | None:
    found = _NUMBER.findall(text or "")
    return found[-1].replace(",", "").rstrip(".") if found else None


def _reference(row: dict) -> str | None:
    """The input's reference answer, carried into the output as `input_answer` (the job renames an
    input `answer` column, which the output's own `answer` would shadow)."""
    ref = row.get("input_answer")
    return None if ref is None else str(ref)


def show(out_dir: str, num_rows: int, chars: int, stream=sys.stdout) -> None:
    shards = os.path.join(out_dir, "shards")
    files = sorted(f for f in os.listdir(shards) if f.startswith("part-") and f.endswith(".parquet"))
    if not files:
        print(f"{out_dir} has no shard files yet.", file=stream)
        return
    rows = []
    for name in files:
        rows.extend(pq.read_table(os.path.join(shards, name)).to_pylist())
    width = 100
    bar = "=" * width
    num_correct = num_graded = 0
    for r in rows:
        ref = _reference(r)
        if ref is not None and r["finish_reason"] != "error":
            num_graded += 1
            num_correct += _last_number(r["completion"]) == _last_number(ref)
    print(bar, file=stream)
    print(f"{len(rows)} samples in {len(files)} shard file(s) of {out_dir}; showing {min(num_rows, len(rows))}",
          file=stream)
    for r in rows[:num_rows]:
        print(bar, file=stream)
        print(f"id {r['id']}  sample {r['sample_idx']}  finish={r['finish_reason']}  "
              f"tokens: prompt {r['num_prompt_tokens']}, completion {r['num_completion_tokens']}, "
              f"reasoning {r['num_reasoning_tokens']}  peak KV {r['peak_kv_tokens']}  "
              f"e2e {r['e2e_s'] or 0:.2f}s", file=stream)
        fields = [("question", _excerpt(_question(r["prompt"]), chars))]
        if r["finish_reason"] == "error":
            fields.append(("error", r["error"] or ""))
        else:
            if r["reasoning"]:
                fields.append(("reasoning", _excerpt(r["reasoning"], chars)))
            fields.append(("answer", _excerpt(r["answer"] or r["completion"], chars)))
            ref = _reference(r)
            if ref is not None:
                got = _last_number(r["completion"])
                mark = "correct" if got is not None and got == _last_number(ref) else "wrong"
                fields.append(("reference", f"{ref}  (last number in the completion: {got}; {mark})"))
        for label, text in fields:
            lines = textwrap.wrap(text, width=width - 12) or [""]
            print(f"  {label:<9} {lines[0]}", file=stream)
            for line in lines[1:]:
                print(f"  {'':<9} {line}", file=stream)
    print(bar, file=stream)
    summary_path = os.path.join(out_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            s = json.load(f)
        print("summary", file=stream)
        keys = ("complete", "model", "kv_policy", "kv_budget", "rows", "samples", "errors", "finish_reasons",
                "prompt_tokens", "completion_tokens", "reasoning_tokens", "tokens_per_s", "wall_time_s",
                "mean_peak_kv_tokens", "max_peak_kv_tokens", "evicted_pages", "mean_e2e_s")
        for k in keys:
            print(f"  {k:<20} {s.get(k)}", file=stream)
        if num_graded:
            print(f"  {'accuracy':<20} {num_correct}/{num_graded} (last number vs reference answer)", file=stream)
    print(bar, file=stream)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--rows", type=int, default=4, help="samples to show")
    p.add_argument("--chars", type=int, default=240, help="characters of each text shown")
    args = p.parse_args()
    if not os.path.isdir(os.path.join(args.out_dir, "shards")):
        sys.exit(f"error: {args.out_dir} is not a raas_batch output folder (no shards/): pass the --output of a job.")
    show(args.out_dir, args.rows, args.chars)


if __name__ == "__main__":
    main()
