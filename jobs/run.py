"""Entry point for `ray job submit`: the batch job, distributed over the cluster it is submitted to.

    ray job submit --working-dir . -- python jobs/run.py --config configs/NAME.yaml \
        [the flags of `python -m raas_batch`] [--num-workers N]

It is `python -m raas_batch --ray`: inside a Ray job RAY_ADDRESS names the cluster, so the driver
joins it and starts one GenerationWorker actor per GPU (`--num-workers` to choose). Paths are seen by
the driver and by every worker: give `--input` and `--output` as absolute paths on storage every node
mounts (a relative path would land in the job's temporary copy of the working directory).
Exit status as the CLI's: 0 complete, 1 some shard failed (named; rerun with --resume), 2 the job
could not start, 130 interrupted.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout (or the job's copy of it) without installing
    sys.path.insert(0, ROOT)


def main(argv: list[str] | None = None) -> int:
    from raas_batch.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("--ray", "--no-ray") or a.startswith("--ray-address") for a in args):
        args.insert(0, "--ray")
    for flag in ("--input", "--output"):
        if flag in args[:-1]:
            value = args[args.index(flag) + 1]
            if not os.path.isabs(value) and not value.startswith("hf:") and os.environ.get("RAY_JOB_ID"):
                print(f"note: {flag} {value} is relative to this job's copy of the working directory; "
                      "use an absolute path on shared storage to find the output after the job.", file=sys.stderr)
    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
