"""What the launcher and the machine say about a run: how many processes were started, which one this is,
whether there is an accelerator, and whether the Hugging Face Hub can be reached.

The one home of the launcher environment variables (torchrun, `accelerate launch`, mpirun / MPICH / MVAPICH),
read by the Trainer integration, the examples and the tests.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


# Set by a launcher to the number of processes it started: torchrun and accelerate (`WORLD_SIZE`), MPICH / Intel
# MPI (`PMI_SIZE`), Open MPI (`OMPI_COMM_WORLD_SIZE`), MVAPICH (`MV2_COMM_WORLD_SIZE`); the first one set wins.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# Every variable a launcher sets about the processes (what a test clears to see a single-process run).
LAUNCHER_VARIABLES = (*WORLD_SIZE_VARIABLES, "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_processes() -> int:
    """How many processes the launcher started (1 without a launcher).

    Returns:
        `int`: The value of the first of [`WORLD_SIZE_VARIABLES`] that holds a number, else 1.
    """
    for name in WORLD_SIZE_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def process_rank() -> int:
    """The global rank the launcher gave this process (0 without a launcher)."""
    rank = os.environ.get("RANK", "0")
    return int(rank) if rank.isdigit() else 0


def has_accelerator() -> bool:
    """Whether torch sees a GPU or another accelerator (CUDA, ROCm, XPU, MPS, ...)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return accelerator.is_available()
    return torch.cuda.is_available()


def needs_cpu_ddp(args) -> bool:
    """Whether `args` must turn on `use_cpu` to be DDP: several processes launched, no accelerator, no DeepSpeed.

    transformers (5.24) puts such a run in distributed mode only with `use_cpu=True`; without it every process
    trains alone (accelerate's `PartialState` finds no GPU backend and falls back to `DistributedType.NO`).

    Args:
        args (`TrainingArguments`): The arguments of the run (`use_cpu` and `deepspeed` are read).
    """
    if args.use_cpu or os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
        return False
    return launched_processes() > 1 and not has_accelerator() and not args.deepspeed


def check_distributed_setup(args) -> None:
    """Refuse to train independent copies when several processes were launched.

    transformers only warns ("process group is initialized, but parallel_mode != ParallelMode.DISTRIBUTED")
    when, e.g., `torchrun --nproc_per_node 2` runs on a machine without GPUs and `use_cpu` is off: every process
    then trains its own model and they all write to the same folder.

    Args:
        args (`TrainingArguments`): The Trainer's arguments (their devices are set up by this call).

    Raises:
        RuntimeError: If several processes were launched but the Trainer is not in distributed mode.
    """
    launched = launched_processes()
    group = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if max(launched, group) > 1 and args.parallel_mode.value != "distributed":
        raise RuntimeError(
            f"{max(launched, group)} processes were launched, but the Trainer is not in distributed mode "
            f"(parallel_mode={args.parallel_mode.value}, device={args.device}): each process would train its own "
            "copy of the model. On a machine without GPUs pass `--use_cpu True` (DDP over gloo; "
            "`TrActTrainingArguments` does this by itself when no accelerator is found), or launch with "
            "`accelerate launch --config_file examples/accelerate_configs/cpu_multi_process.yaml`; with GPUs, "
            "give each process one (`torchrun --nproc_per_node <number of GPUs>`)."
        )


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` is set (read at call time: huggingface_hub reads it once, when it is imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class HubUnreachableError(OSError):
    """The Hub does not answer and a file must come from it (one line, naming `HF_HUB_OFFLINE=1`)."""


def check_hub_reachable(name: str, timeout: float = 3.0) -> None:
    """Fail at once when `name` (a model or dataset id) would be read from the Hub and the Hub does not answer.

    Without this check, huggingface_hub retries a failed connection 5 times with backoff (~30 s, six log
    lines) before failing. Local paths and `HF_HUB_OFFLINE=1` (cache only) need no network and pass.
    One request to the Hub's endpoint, through huggingface_hub's own HTTP client (proxies, `HF_ENDPOINT`).

    Args:
        name (`str`): A Hub id or a local path.
        timeout (`float`, *optional*, defaults to `3.0`): Seconds to wait for the Hub's answer.

    Raises:
        HubUnreachableError: If the Hub cannot be reached, saying how to use the local cache instead.
    """
    if os.path.exists(name) or hub_offline():
        return
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)  # any HTTP answer means the Hub is reachable
    except Exception as exc:  # noqa: BLE001 - DNS, connection, proxy or TLS failure: reported as one line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HubUnreachableError(
            f"cannot reach the Hub ({constants.ENDPOINT}: {reason}) to read {name!r}; connect to the network, "
            "or set HF_HUB_OFFLINE=1 to use only the files already in the local cache"
        ) from None


__all__ = [
    "HubUnreachableError",
    "LAUNCHER_VARIABLES",
    "WORLD_SIZE_VARIABLES",
    "check_distributed_setup",
    "check_hub_reachable",
    "has_accelerator",
    "hub_offline",
    "launched_processes",
    "needs_cpu_ddp",
    "process_rank",
]
