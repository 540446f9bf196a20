"""CUDA-only checks (skipped without a GPU; run on a lent H100 by benchmarks/gpu_run.sh)."""

import copy

import pytest
import torch
import torch.nn as nn

from hf_tract import apply_tract

from .oracle import patch_matrix_reference, relative_error, tract_grad_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LAYERS = {
    "vit_patch": (lambda: nn.Conv2d(3, 64, 16, stride=16), (8, 3, 64, 64)),
    "resnet_stem": (lambda: nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), (8, 3, 64, 64)),
    "linear_tokens": (lambda: nn.Linear(48, 32), (8, 16, 48)),
    "few_rows": (lambda: nn.Conv2d(3, 8, 16, stride=16), (1, 3, 16, 32)),
}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(LAYERS))
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
