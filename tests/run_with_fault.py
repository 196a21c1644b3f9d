"""Run one of APL's scripts as a user would, with a fault injected into its saves (test helper).

    python tests/run_with_fault.py FAULT SCRIPT [ARGS ...]

FAULT is `<kind>:<name>:<n>`: the n-th `torch.save` into a file whose name contains <name> (the temporary file of
an atomic save is named after its target) first writes some bytes, then fails:
- enospc: raises OSError(ENOSPC), as a full disk does;
- pos: raises the RuntimeError torch.save gives when its stream fails mid-write ('unexpected pos ...');
- kill: the process kills itself with SIGKILL, leaving the half-written temporary file behind;
- term: the process sends itself SIGTERM (as a scheduler preempting a job does) and the save goes on.
"""

from __future__ import annotations

import errno
import os
import runpy
import signal
import sys
from pathlib import Path

import torch


def install(fault: str) -> None:
    kind, name, nth = fault.split(":")
    real_save, calls = torch.save, {"n": 0}

    def faulty_save(obj, f, *args, **kwargs):
        target = str(f)
        if name in Path(target).name:
            calls["n"] += 1
            if calls["n"] == int(nth) and kind == "term":
                os.kill(os.getpid(), signal.SIGTERM)
            elif calls["n"] == int(nth):
                with open(target, "wb") as out:
                    out.write(b"PK\x03\x04 half a file")
                if kind == "enospc":
                    raise OSError(errno.ENOSPC, "No space left on device")
                if kind == "pos":
                    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1088 vs 1010")
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise ValueError(f"unknown fault kind {kind!r}")
        return real_save(obj, f, *args, **kwargs)

    torch.save = faulty_save


if __name__ == "__main__":
    install(sys.argv[1])
    script = sys.argv[2]
    sys.argv = [script, *sys.argv[3:]]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")
