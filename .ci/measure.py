"""Run a command and report its wall time and the peak resident memory of its whole process tree.

`/usr/bin/time -v` reports the largest single process; with pytest-xdist (and the suite's multi-process tests)
the memory in use at once is the sum over the tree, which this samples from /proc every 0.2 s (Linux only).

Usage: python .ci/measure.py COMMAND [ARGS...]   (exit status: the command's)
"""

import os
import subprocess
import sys
import threading
import time


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(parent, []).append(int(entry))
    return tree


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kib(root: int) -> int:
    """Resident memory (KiB) of `root` and all its descendants, now."""
    children, total, stack = _children(), 0, [root]
    while stack:
        pid = stack.pop()
        total += _rss_kib(pid)
        stack.extend(children.get(pid, []))
    return total


def main(command: list[str]) -> int:
    start = time.monotonic()
    process = subprocess.Popen(command)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_kib(process.pid))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    status = process.wait()
    done.set()
    sampler.join()
    wall = time.monotonic() - start
    print(
        f"measure: wall {int(wall // 60)} min {wall % 60:.1f} s, peak resident memory of the process tree "
        f"{peak / 2**20:.2f} GiB ({os.cpu_count()} CPUs)",
        file=sys.stderr,
    )
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
