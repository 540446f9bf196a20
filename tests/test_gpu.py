"""Checks a GPU user's run depends on (run on a lent GPU by benchmarks/gpu_run.sh).

The CUDA tests are marked `gpu` and skipped without a CUDA device. Those that train through the example script or
use a process group also run as CPU stand-ins (the same test code on CPU, gloo, aot_eager), so that the test code
itself is known to work before GPU time is spent on it; `pytest -m gpu` selects only the CUDA ones.
"""

import contextlib
import copy
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from hf_tract import apply_tract, is_tract_applied
from hf_tract.geometry import PatchGeometry
from hf_tract.modules import _GramState, tract_op

from tests.oracle import patch_matrix_reference, relative_error, tract_grad_reference


requires_cuda = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
# A test parametrised over devices: CUDA (marked as above) and its CPU stand-in.
DEVICES = [pytest.param("cuda", marks=requires_cuda, id="cuda"), pytest.param("cpu", id="cpu_stand_in")]

LAYERS = {
    "vit_patch": (lambda: nn.Conv2d(3, 64, 16, stride=16), (8, 3, 64, 64)),
    "resnet_stem": (lambda: nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), (8, 3, 64, 64)),
    "linear_tokens": (lambda: nn.Linear(48, 32), (8, 16, 48)),
    "few_rows": (lambda: nn.Conv2d(3, 8, 16, stride=16), (1, 3, 16, 32)),
}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(LAYERS))
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_backward_has_no_host_sync_and_matches_closed_form(case, dtype):
    build, shape = LAYERS[case]
    torch.manual_seed(0)
    plain = build().cuda()
    patched = apply_tract(copy.deepcopy(plain))
    x = torch.randn(shape, device="cuda")
    upstream = torch.randn_like(plain(x))
    grads = {}
    for name, layer in (("plain", plain), ("tract", patched)):
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = layer(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out.float().backward(upstream)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        grads[name] = layer.weight.grad
    assert grads["tract"].dtype == torch.float32
    # Under autocast the weight gradient is formed from the float32 input and the upstream gradient as the
    # half-precision op received it (rounded to `dtype`): the float64 closed form of exactly that.
    plain64 = copy.deepcopy(plain).cpu().double()
    plain64.zero_grad(set_to_none=True)
    plain64(x.cpu().double()).backward(upstream.cpu().to(dtype or torch.float32).double())
    expected = tract_grad_reference(plain64.weight.grad, patch_matrix_reference(plain64, x.cpu()), 0.1)
    # few_rows (N=2 < n=768, Woodbury): TrAct cancels most of the gradient, which amplifies the float32 rounding
    # of the plain gradient (1.4e-4 for this test's logic run on CPU, fp32 and autocast alike).
    assert relative_error(grads["tract"].cpu(), expected) <= (1e-3 if case == "few_rows" else 1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(LAYERS))
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_autocast_output_input_and_bias_gradients_are_the_plain_ones(case, dtype):
    """The autocast path runs the op with a detached weight: cuDNN / cuBLAS must still give the plain bits."""
    build, shape = LAYERS[case]
    torch.manual_seed(0)
    plain = build().cuda()
    patched = apply_tract(copy.deepcopy(plain))
    x = torch.randn(shape, device="cuda")
    upstream = torch.randn_like(plain(x))
    results = {}
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        for name, layer in (("plain", plain), ("tract", patched)):
            x_req = x.clone().requires_grad_(True)
            with torch.autocast("cuda", dtype=dtype):
                out = layer(x_req)
            out.float().backward(upstream)
            bias = layer.bias.grad if layer.bias is not None else None
            results[name] = (out.detach(), x_req.grad, bias)
    for plain_value, tract_value in zip(results["plain"], results["tract"]):
        assert (plain_value is None and tract_value is None) or torch.equal(plain_value, tract_value)


@contextlib.contextmanager
def _sync_debug_errors(device: str, enabled: bool = True):
    """On CUDA, any device-to-host synchronisation inside the block raises (a no-op on CPU)."""
    if device != "cuda" or not enabled:
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def _one_rank_group(backend: str, tmp_path: Path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_sync_gram_all_reduce_path_in_a_one_rank_group(device, dtype, tmp_path):
    """`sync_gram=True` with a real backend (NCCL on CUDA, gloo on CPU).

    In a one-rank group the layer keeps its local Gram (nothing to reduce); the all-reduce path itself (Gram and
    row count in one buffer, reduced asynchronously from the forward pass, waited for in the backward) is driven
    through the state the layer builds for a group of several ranks: one rank's sum is its own Gram, so the result
    is the closed form, and the wait must not synchronise the host.
    """
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 16, 7, stride=2, padding=3).to(device)
    patched = apply_tract(copy.deepcopy(plain), sync_gram=True)
    x = torch.randn(4, 3, 32, 32, device=device)
    upstream = torch.randn_like(plain(x))
    geometry = PatchGeometry.of(plain)
    with _one_rank_group("nccl" if device == "cuda" else "gloo", tmp_path) as group:
        assert patched.tract_config.sync_group() is None
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            state = _GramState(x, geometry, plain.weight[0].numel(), group)
            out = tract_op(patched, lambda w: nn.Conv2d._conv_forward(patched, x, w, patched.bias), patched.weight, x, geometry, state=state)
        assert state.work is not None and isinstance(state.num_rows, torch.Tensor)
        with _sync_debug_errors(device):
            out.float().backward(upstream)
    reference = copy.deepcopy(plain).cpu().double()
    reference(x.cpu().double()).backward(upstream.cpu().to(dtype or torch.float32).double())
    expected = tract_grad_reference(reference.weight.grad, patch_matrix_reference(reference, x.cpu()), 0.1)
    assert relative_error(patched.weight.grad.cpu(), expected) <= 1e-4


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_image_classification.py"
TINY_VIT = (
    "image_size=28,patch_size=7,num_channels=1,hidden_size=32,num_hidden_layers=1,"
    "num_attention_heads=2,intermediate_size=64"
)
BATCH = 16


def _run_example(tmp_path, monkeypatch, device: str, steps: int, extra_args: list[str], unchecked_backwards: int = 2):
    """The example's `main()` in this process, `steps` steps of bf16 training with `tract_log_stats` on.

    From backward number `unchecked_backwards + 1` on, each step's backward runs with CUDA sync-debug mode
    "error" (the first ones may compile or initialise libraries). Returns the trainer and how many backwards
    were checked.
    """
    for module in ("accelerate", "datasets", "evaluate"):  # what the example needs beyond hf_tract's own deps
        pytest.importorskip(module)
    from accelerate import Accelerator

    spec = importlib.util.spec_from_file_location("train_image_classification", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # dataclasses look their module up there
    spec.loader.exec_module(example)
    checked = []
    original_backward = Accelerator.backward

    def backward(self, loss, **kwargs):
        check = backward.calls >= unchecked_backwards  # calls before this one
        backward.calls += 1
        with _sync_debug_errors(device, enabled=check):
            result = original_backward(self, loss, **kwargs)
        if check:
            checked.append(True)
        return result

    backward.calls = 0
    monkeypatch.setattr(Accelerator, "backward", backward)
    for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    args = [
        "--output_dir", str(tmp_path / "out"), "--config_overrides", TINY_VIT, "--bf16", "True",
        "--max_steps", str(steps), "--max_train_samples", str(BATCH * steps), "--per_device_train_batch_size", str(BATCH),
        "--dataloader_drop_last", "True", "--do_eval", "False", "--logging_steps", str(max(1, steps // 10)),
        "--tract_log_stats", "True", "--use_cpu", str(device == "cpu"),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), *args, *extra_args])
    trainer = example.main()
    return trainer, len(checked)


def _assert_trained_with_tract(trainer, steps: int, checked: int, device: str):
    assert trainer.state.global_step == steps
    assert is_tract_applied(trainer.model)
    assert trainer.model.vit.embeddings.patch_embeddings.projection.weight.device.type == device
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all(math.isfinite(entry["loss"]) for entry in logs)
    # The statistics are recorded inside the TrAct backward: proof that it ran, with a gradient it changed.
    for entry in logs:
        plain, tract = entry["tract/grad_norm_plain"], entry["tract/grad_norm"]
        assert math.isfinite(plain) and math.isfinite(tract) and plain != tract
    assert checked == steps - 2  # every backward but the first two ran under sync-debug "error" (CUDA)


@pytest.mark.slow
@pytest.mark.parametrize(
    "device, steps", [pytest.param("cuda", 100, marks=requires_cuda, id="cuda"), pytest.param("cpu", 3, id="cpu_stand_in")]
)
def test_example_trainer_run_bf16(device, steps, tmp_path, monkeypatch):
    trainer, checked = _run_example(tmp_path, monkeypatch, device, steps, [])
    _assert_trained_with_tract(trainer, steps, checked, device)


@pytest.mark.slow
@pytest.mark.parametrize(
    "device, steps, backend",
    [
        pytest.param("cuda", 100, "inductor", marks=requires_cuda, id="cuda_inductor"),
        pytest.param("cpu", 3, "aot_eager", id="cpu_stand_in_aot_eager"),
    ],
)
def test_example_trainer_run_bf16_torch_compile(device, steps, backend, tmp_path, monkeypatch):
    trainer, checked = _run_example(
        tmp_path, monkeypatch, device, steps, ["--torch_compile", "True", "--torch_compile_backend", backend]
    )
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    _assert_trained_with_tract(trainer, steps, checked, device)
