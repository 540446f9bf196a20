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
    expected = tract_grad_reference(grads["plain"].cpu(), patch_matrix_reference(plain.cpu(), x.cpu()), 0.1)
    assert relative_error(grads["tract"].cpu(), expected) <= 1e-4
