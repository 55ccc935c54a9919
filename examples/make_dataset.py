"""Make a small GSM8K-style dataset of reasoning questions with the `reasoning-gym` package.

    python examples/make_dataset.py --out examples/gsm8k_mini.jsonl --num 8

Each line: {"id", "question", "answer", "source", "messages": [{"role": "user", "content": ...}]}.
The runner takes the `messages` column (there is no `prompt` column), so the model's chat template is
applied; `answer` is the reference answer that examples/show_output.py compares against. The same
arguments always give the same file (the generator is seeded).
"""

from __future__ import annotations

import argparse
import json
import os

INSTRUCTION = "Think step by step, then give the final answer as a number on the last line."


def make_rows(num: int, seed: int, dataset: str) -> list[dict]:
    import reasoning_gym

    ds = reasoning_gym.create_dataset(dataset, size=num, seed=seed)
    rows = []
    for i, item in enumerate(ds):
        question = item["question"].strip()
        rows.append({
            "id": f"{dataset}-{seed}-{i:04d}",
            "question": question,
            "answer": str(item["answer"]),
            "source": dataset,
            "messages": [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}],
        })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="examples/gsm8k_mini.jsonl")
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dataset", default="gsm_symbolic",
                   help="a reasoning-gym dataset name, e.g. gsm_symbolic, basic_arithmetic, chain_sum")
    args = p.parse_args()
    rows = make_rows(args.num, args.seed, args.dataset)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, args.out)
    print(f"wrote {len(rows)} {args.dataset} rows to {args.out}")


if __name__ == "__main__":
    main()
