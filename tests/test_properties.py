"""Property-based tests: random Linear / Conv1d / Conv2d / Conv3d configurations against the fp64 closed form."""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_tract import apply_tract

from .oracle import patch_matrix_reference, relative_error, tract_grad_reference

CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def conv_configs(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 3]))
    in_channels = groups * draw(st.integers(1, 2))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 4 if dims < 3 else 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    if padding_kind == "same":
        stride = (1,) * dims  # torch rejects 'same' with stride > 1
        padding = "same"
    elif padding_kind == "valid":
        padding = "valid"
    elif padding_kind == "int":
        padding = draw(st.integers(0, 2))
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    pads = padding if isinstance(padding, tuple) else (padding,) * dims if isinstance(padding, int) else None
    effective = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    # Large enough for the kernel, and for reflect / circular padding (which need pad < size).
    min_size = [max(e, 3) for e in effective]
    sizes = tuple(draw(st.integers(m, m + (6 if dims < 3 else 3))) for m in min_size)
    if padding_mode in ("reflect", "circular") and pads is not None and any(p >= s for p, s in zip(pads, sizes)):
        padding_mode = "zeros"
    batch = draw(st.integers(1, 3))
    bias = draw(st.booleans())
    layer = CONV_TYPES[dims](
        in_channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation,
        groups=groups, bias=bias, padding_mode=padding_mode,
    )
    return layer, (batch, in_channels, *sizes)


@st.composite
def linear_configs(draw):
    in_features = draw(st.integers(1, 40))
    leading = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    return nn.Linear(in_features, draw(st.integers(1, 6)), bias=draw(st.booleans())), (*leading, in_features)


def _check_against_closed_form(layer, shape, lambda_, seed):
    torch.manual_seed(seed)
    layer = layer.double()
    x = torch.randn(shape, dtype=torch.float64)
    patched = apply_tract(copy.deepcopy(layer), lambda_=lambda_)
    upstream = torch.randn_like(layer(x))
    layer(x).backward(upstream)
    x_req = x.clone().requires_grad_(True)
    patched(x_req).backward(upstream)
    expected = tract_grad_reference(layer.weight.grad, patch_matrix_reference(layer, x), lambda_)
    assert relative_error(patched.weight.grad, expected) <= 1e-9
    if layer.bias is not None:
        assert torch.equal(patched.bias.grad, layer.bias.grad)


@PROPERTY_SETTINGS
@given(config=conv_configs(), lambda_=st.floats(0.01, 10.0), seed=st.integers(0, 2**16))
def test_random_convolutions_match_closed_form(config, lambda_, seed):
    _check_against_closed_form(*config, lambda_, seed)


@PROPERTY_SETTINGS
@given(config=linear_configs(), lambda_=st.floats(0.01, 10.0), seed=st.integers(0, 2**16))
def test_random_linears_match_closed_form(config, lambda_, seed):
    _check_against_closed_form(*config, lambda_, seed)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_few_patches_large_kernel(dims):
    """N < n: one image, a kernel as large as the input (the Woodbury path)."""
    kernel = (5,) * dims
    layer = CONV_TYPES[dims](3, 4, kernel, stride=2, padding=1)
    _check_against_closed_form(layer, (1, 3, *((5,) * dims)), 0.1, 0)
