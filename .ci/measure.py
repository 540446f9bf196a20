"""Run a command and report its wall time and the peak memory of its whole process tree.

`/usr/bin/time -v` reports the largest single process; with pytest-xdist (and the suite's multi-process tests)
the memory in use at once is the sum over the tree, which this samples from /proc every 0.2 s (Linux only) as
the sum of the processes' proportional set sizes (PSS), and the processes that held it at the peak.

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


def _pss_kib(pid: int) -> int:
    # Proportional set size: a page shared by k processes (torch's libraries, ...) counts 1/k in each, so the sum
    # over the tree is the memory it holds at once (RSS would count the shared libraries once per process).
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:100]
    except OSError:
        return "?"


def tree_pss_kib(root: int) -> tuple[int, list[tuple[int, str]]]:
    """Memory (KiB) held by `root` and all its descendants now, and each process's share."""
    children, parts, stack = _children(), [], [root]
    while stack:
        pid = stack.pop()
        parts.append((_pss_kib(pid), _name(pid)))
        stack.extend(children.get(pid, []))
    return sum(kib for kib, _ in parts), parts


def main(command: list[str]) -> int:
    start = time.monotonic()
    process = subprocess.Popen(command)
    peak, peak_parts = 0, []
    done = threading.Event()

    def sample():
        nonlocal peak, peak_parts
        while not done.is_set():
            total, parts = tree_pss_kib(process.pid)
            if total > peak:
                peak, peak_parts = total, parts
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    status = process.wait()
    done.set()
    sampler.join()
    wall = time.monotonic() - start
    print(
        f"measure: wall {int(wall // 60)} min {wall % 60:.1f} s, peak memory of the process tree (sum of PSS) "
        f"{peak / 2**20:.2f} GiB ({os.cpu_count()} CPUs); at the peak:",
        file=sys.stderr,
    )
    for kib, name in sorted(peak_parts, reverse=True)[:8]:
        print(f"measure:   {kib / 2**20:5.2f} GiB  {name}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
