"""The fidelity grid's table and plot from bench_fidelity.py's results (one or more runs, same prompts).

Each input is a fidelity.json (or a checkpoint copy of one) written by benchmarks/bench_fidelity.py. Cells
are merged by name; when runs stopped early (the `partial_steps` of a cell), only inputs at the same
number of engine steps are comparable, so the report names the step count of each input. A cell
`raas-auto` is derived per prompt from `raas` (prompt pinned) and `raas-nopin`: the prompt is pinned
when its pages are at most half of the budget's (`pin_prompt="auto"`); prompts are independent
sequences, so this is what a `pin_prompt="auto"` run gives.

    python benchmarks/fidelity_report.py benchmarks/results/fidelity_grid/fidelity.json \
        benchmarks/results/fidelity_grid_b/fidelity.json --out benchmarks/results/fidelity_grid/report
"""

from __future__ import annotations

import argparse
import json
import math
import os

MAIN = ["raas", "raas-auto", "raas-nopin", "raas-mass", "raas-paper", "quest", "h2o", "streaming"]
# The grid's `raas` cells ran with the prompt pinned (the default then); raas-nopin is today's default
LABELS = {"raas": "raas pin_prompt=true (paper)", "raas-auto": "raas pin_prompt=auto",
          "raas-nopin": "raas pin_prompt=false (default)",
          "raas+recent2": "raas pin_prompt=true recent_pages=2", "raas+alpha": "raas pin_prompt=true refresh_rule=alpha"}
METRICS = ("agreement", "kl", "first_divergence", "free_length", "dense_length")


def load(paths: list[str]) -> tuple[dict, list[dict]]:
    cells, headers = {}, []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        steps = {c.get("partial_steps") for c in data["cells"].values()}
        headers.append({"path": path, "steps": sorted(s for s in steps if s) or None, **{
            k: data.get(k) for k in ("num_prompts", "max_new_tokens", "prompt_tokens", "command")}})
        cells.update(data["cells"])
    return cells, headers


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def derive_auto(cells: dict, prompt_tokens: list[int], page_size: int = 16) -> None:
    """raas-auto@L from raas@L and raas-nopin@L, prompt by prompt."""
    for key, pinned in list(cells.items()):
        if pinned["variant"] != "raas" or f"raas-nopin@{pinned['budget']}" not in cells:
            continue
        budget = pinned["budget"]
        unpinned = cells[f"raas-nopin@{budget}"]
        per = []
        for i, n in enumerate(prompt_tokens):
            pin = 2 * math.ceil(n / page_size) <= budget // page_size
            per.append({**(pinned if pin else unpinned)["per_prompt"][i], "pinned": pin})
        cell = {"variant": "raas-auto", "policy": "raas", "options": {"pin_prompt": "auto"}, "budget": budget,
                "per_prompt": per, "partial_steps": pinned.get("partial_steps"),
                "over_budget_prompts": pinned.get("over_budget_prompts"),
                "pinned_prompts": sum(p["pinned"] for p in per)}
        for m in METRICS:
            cell[m] = mean(p.get(m) for p in per)
        cell["length_change"] = (None if cell["free_length"] is None or cell["dense_length"] is None
                                 else cell["free_length"] - cell["dense_length"])
        cells[f"raas-auto@{budget}"] = cell


def table(cells: dict) -> str:
    budgets = sorted({c["budget"] for c in cells.values()})
    names = [n for n in MAIN if any(c["variant"] == n for c in cells.values())]
    names += sorted({c["variant"] for c in cells.values()} - set(names))
    lines = ["| variant | " + " | ".join(f"L = {b}" for b in budgets) + " |",
             "| --- | " + " | ".join("---:" for _ in budgets) + " |"]
    best = {b: max((c["agreement"] for c in cells.values() if c["budget"] == b and c["variant"] != "quest"),
                   default=None) for b in budgets}
    for name in names:
        row = []
        for b in budgets:
            c = cells.get(f"{name}@{b}")
            if c is None:
                row.append("")
                continue
            mark = "**" if c["agreement"] == best[b] else ""
            row.append(f"{mark}{100 * c['agreement']:.1f}{mark} / {c['kl']:.3f}")
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def detail(cells: dict) -> str:
    lines = ["| variant | budget | agreement % | mean KL | tokens to 1st divergence | free length | dense length |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in sorted(cells.values(), key=lambda c: (c["budget"], MAIN.index(c["variant"]) if c["variant"] in MAIN
                                                   else len(MAIN), c["variant"])):
        def fmt(v, spec):
            return "-" if v is None else format(v, spec)

        lines.append(f"| {LABELS.get(c['variant'], c['variant'])} | {c['budget']} | {100 * c['agreement']:.1f} | {c['kl']:.4f} | "
                     f"{fmt(c['first_divergence'], '.0f')} | {fmt(c['free_length'], '.0f')} | "
                     f"{fmt(c['dense_length'], '.0f')} |")
    return "\n".join(lines)


def plot(cells: dict, title: str, path: str, main=MAIN, labels=LABELS) -> None:
    """Agreement and KL against the budget, one line per variant (those in `main` solid); also what
    bench_fidelity.py draws for a single run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = sorted({c["variant"] for c in cells.values()}, key=lambda n: (n not in main, n))
    for name in names:
        cs = sorted((c for c in cells.values() if c["variant"] == name), key=lambda c: c["budget"])
        style = "-o" if name in main else ":x"
        label = labels.get(name, name)
        axes[0].plot([c["budget"] for c in cs], [100 * c["agreement"] for c in cs], style, label=label)
        axes[1].plot([c["budget"] for c in cs], [max(c["kl"], 1e-6) for c in cs], style, label=label)
    for ax, t in zip(axes, ["teacher-forced top-1 agreement with dense (%)", "mean KL(dense || sparse)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("kv_budget L (tokens)")
        ax.set_title(t, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="fidelity.json files of bench_fidelity.py")
    ap.add_argument("--out", help="write OUT.md (tables) and OUT.png (plot)")
    args = ap.parse_args()
    cells, headers = load(args.inputs)
    derive_auto(cells, headers[0]["prompt_tokens"])
    steps = sorted({s for h in headers for s in (h["steps"] or [])})
    scope = (f"{headers[0]['num_prompts']} prompts, teacher-forced over the first "
             f"{'/'.join(map(str, steps))} engine steps of {headers[0]['max_new_tokens']}" if steps else
             f"{headers[0]['num_prompts']} prompts x {headers[0]['max_new_tokens']} tokens")
    text = (f"Scope: {scope}. Inputs: " + "; ".join(f"{h['path']} (steps {h['steps'] or 'all'})" for h in headers)
            + "\n\nAgreement % / mean KL (bold: best at that budget among the O(L) policies)\n\n" + table(cells)
            + "\n\n" + detail(cells) + "\n")
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".md", "w") as f:
            f.write(text)
        plot(cells, f"SmolLM2-135M-Instruct, {scope}, page 16", args.out + ".png")


if __name__ == "__main__":
    main()
