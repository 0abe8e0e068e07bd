"""`bpo ARGS` as one process of a torchrun launch, failing if the command left a gloo thread
running: one alive when Python shuts down can abort a process whose work is done."""

from __future__ import annotations

import os
import sys

from bpo.cli import main


def gloo_threads() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm", encoding="utf-8") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # a thread that ended while we looked
            continue
    return [name for name in names if "gloo" in name]


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if left := gloo_threads():
        print(f"launch_bpo: gloo threads still running after bpo: {left}", file=sys.stderr)
        sys.exit(99)
    sys.exit(code)
