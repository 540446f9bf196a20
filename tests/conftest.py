"""What the test files share: the tiny models and synthetic data, and fixtures.

The builders live in `tests/multiproc/tiny.py` because the multi-process scripts under `tests/multiproc` run
outside pytest and import them too; they are re-exported here so that a test file can take them from one
place: `from tests.conftest import tiny_vit, ...` (the scripts import `tests.multiproc.tiny` directly).

Nothing heavy is imported at the top of this file: pytest-xdist's controller process loads it too, before it
starts the workers, and torch / transformers there would only delay them. The builders load on first use.
"""

from __future__ import annotations

import importlib
import os

import pytest


__all__ = [
    "FIRST_LAYER",
    "TinyImages",
    "conv_stem",
    "first_weight",
    "make_args",
    "tiny_resnet",
    "tiny_rgb_vit",
    "tiny_vit",
    "trainer_kwargs",
]


# Tests that start processes of their own (torchrun, the examples, the benchmarks' smoke runs): each process
# imports torch and transformers (~0.5 GB), so under pytest-xdist they take turns (a lock shared by the workers)
# while the other worker goes on with in-process tests.
SUBPROCESS_TEST_FILES = {"test_distributed.py", "test_examples.py", "test_interrupted.py", "test_benchmark_convergence.py",
                         "test_benchmark_overhead.py", "test_benchmark_finetune.py"}


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module("tests.multiproc.tiny"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pytest_configure(config):
    # Under pytest-xdist every worker is a process of its own: one torch thread each, so that two workers do not
    # oversubscribe two cores (the tiny models of the suite are launch-bound; more threads buy them nothing).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_subprocess_test_at_a_time(request, tmp_path_factory):
    node = request.node
    if not (node.get_closest_marker("multiproc") or node.path.name in SUBPROCESS_TEST_FILES):
        yield
        return
    import fcntl

    # The workers' temporary folders share a parent (`.../pytest-N/popen-gw0`, `popen-gw1`): the lock lives there.
    with open(tmp_path_factory.getbasetemp().parent / "subprocess-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(autouse=True, scope="module")
def _release_freed_memory():
    """After each test module, hand the memory its models freed back to the OS (glibc keeps freed heap pages
    otherwise), so that a long-lived xdist worker holds less than its largest test needed. (Part of the measured
    configuration; its own share of the saving was not measured apart.)"""
    yield
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@pytest.fixture
def single_process_env(monkeypatch):
    """No launcher variables: the test sees a single-process run whatever started pytest (returns `monkeypatch`)."""
    from hf_tract.environment import LAUNCHER_VARIABLES

    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch
