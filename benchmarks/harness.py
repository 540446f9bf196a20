"""What every benchmark script shares: bootstrap, device sync, environment metadata, result files.

The scripts in `benchmarks/` are run as files (`python benchmarks/<name>.py`), also on device machines
where only a copy of the working tree exists and `hf_tract` may not be installed. Importing this module
puts the checkout first on `sys.path`, so `import hf_tract` finds the checkout's package. A script
starts with:

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import harness  # noqa: E402  (puts the checkout's hf_tract first on sys.path)

Nothing here imports `hf_tract`; nothing here times anything.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
PLOTS_DIR = REPO_ROOT / "benchmarks" / "plots"

if str(REPO_ROOT) not in sys.path:  # the checkout's hf_tract, also where it is not installed (device machines)
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402


def sync(device: torch.device) -> None:
    """Waits for the work queued on `device` (CUDA); nothing to wait for on CPU.

    Args:
        device (`torch.device`): the benchmark device.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_cpu_threads(device: torch.device, threads: int | None) -> None:
    """Sets the number of torch threads when the benchmark runs on CPU (`None`: leave torch's default).

    Args:
        device (`torch.device`): the benchmark device.
        threads (`int`, *optional*): torch intra-op threads.
    """
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str:
    """Commit of the checkout, `+dirty` when tracked files differ; else `$HF_TRACT_COMMIT`; else `"unknown"`.

    `HF_TRACT_COMMIT` is for copies of the working tree without `.git` (device machines).

    Returns:
        `str`: the commit.
    """
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return os.environ.get("HF_TRACT_COMMIT", "unknown")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return commit + ("+dirty" if dirty else "")


def is_dirty(*paths: str) -> bool | None:
    """Whether `paths` of the checkout differ from the commit (`None` where there is no git checkout)."""
    status = _git("status", "--porcelain", "--", *paths)
    return None if status is None else bool(status)


def device_name(device: torch.device) -> str:
    """Human-readable device name: the CUDA device's name, else `cpu (<processor>)`."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def package_version(name: str) -> str:
    """Installed version of distribution `name`, or `"unavailable (<reason>)"`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError as exc:
        return f"unavailable ({short_error(exc)})"


def _argv() -> list[str]:
    """`sys.argv`, with a package's `__main__.py` path written back as `-m <package>` (what was typed)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name.endswith(".__main__"):
        return ["-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]]
    return list(sys.argv)


def environment(device: torch.device, **extra: Any) -> dict[str, Any]:
    """The metadata every result file carries: device, versions, command line, commit, start time.

    Args:
        device (`torch.device`): the benchmark device.
        **extra: further entries (e.g. the mode or a note).

    Returns:
        `dict`: JSON-serialisable metadata.
    """
    import transformers

    env = {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_tract": package_version("torch-tract"),
        "python": platform.python_version(),
        "command": shlex.join([Path(sys.executable).name, *_argv()]),
        "git_commit": git_commit(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    env.update(extra)
    return env


def short_error(exc: BaseException) -> str:
    """First line of an exception's text, at most 400 characters, for result files."""
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:400]


def save_json(data: dict[str, Any], path: Path) -> None:
    """Writes `data` as JSON atomically (an interrupted run leaves the previous, readable file).

    Args:
        data (`dict`): JSON-serialisable results.
        path (`Path`): the file to (re)write.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
