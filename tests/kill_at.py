"""`python tests/kill_at.py ARGS...`: `python -m raas_batch ARGS...` that SIGKILLs itself at a chosen moment.

RAAS_KILL_AT="<call>:<name>:<when>:<nth>" kills the process at the nth call of `os.<call>` on a path
whose file name contains <name>, `before` or `after` the real call:

    fsync:.part-:before:2          the 2nd shard temp file is written whole, not yet renamed
    replace:part-:after:1          the 1st shard file is renamed into place, the manifest not yet saved
    replace:manifest.json:before:3 the 3rd manifest save: its temp file written, not yet renamed
    replace:manifest.prev.json:before:1   the previous copy is linked, not yet renamed
    replace:summary.json:before:1  the summary's temp file written, not yet renamed

A kill is SIGKILL of this very process (no finally blocks, no flushing), exactly what `kill -9` does,
but at an instant chosen by the test rather than by a timer. Without RAAS_KILL_AT it is the plain CLI.
Test-only: it patches `os` in this process; the package has no kill hook.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys


def _path_of_fd(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def install(spec: str) -> None:
    call, name, when, nth = spec.split(":")
    remaining = [int(nth)]
    real = getattr(os, call)

    def wrapped(*args, **kwargs):
        target = args[1] if call == "replace" else _path_of_fd(args[0]) if call == "fsync" else args[0]
        hit = name in os.path.basename(str(target))
        if hit:
            remaining[0] -= 1
        if hit and remaining[0] == 0 and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if hit and remaining[0] == 0 and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(os, call, wrapped)


if __name__ == "__main__":
    if os.environ.get("RAAS_KILL_AT"):
        install(os.environ["RAAS_KILL_AT"])
    sys.argv = ["raas_batch", *sys.argv[1:]]
    runpy.run_module("raas_batch", run_name="__main__", alter_sys=True)
