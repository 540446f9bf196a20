"""Degenerate batches and odd inputs: defined behaviour, no exception from hf_tract."""

import copy

import pytest
import torch

from hf_tract import apply_tract

from tests.conftest import conv_stem
from tests.oracle import patch_matrix_reference, relative_error, tract_grad_reference


_stem = conv_stem


def _both_grads(pixels, layer=None, dtype=torch.float32):
    plain = (layer or _stem()).to(dtype)
    patched = apply_tract(copy.deepcopy(plain))
    pixels = pixels.to(dtype)
    upstream = torch.randn_like(plain(pixels))
    plain(pixels).backward(upstream)
    patched(pixels).backward(upstream)
    return plain, patched, pixels


def _expected(plain, pixels):
    return tract_grad_reference(plain.weight.grad, patch_matrix_reference(plain, pixels), 0.1)


BATCHES = {
    "batch_of_one": lambda: torch.randn(1, 3, 8, 8),
    "constant_images": lambda: torch.full((4, 3, 8, 8), 0.7),
    "all_zero_images": lambda: torch.zeros(4, 3, 8, 8),
    "grayscale_replicated": lambda: torch.randn(4, 1, 8, 8).expand(4, 3, 8, 8),
    "pixels_0_255": lambda: torch.randint(0, 256, (4, 3, 8, 8)).float(),
    "pixels_0_1": lambda: torch.rand(4, 3, 8, 8),
    "tiny_scale": lambda: torch.randn(4, 3, 8, 8) * 1e-6,
    "huge_scale": lambda: torch.randn(4, 3, 8, 8) * 1e4,
}


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_degenerate_batches_match_closed_form(batch):
    torch.manual_seed(1)
    plain, patched, pixels = _both_grads(BATCHES[batch](), dtype=torch.float64)
    assert torch.isfinite(patched.weight.grad).all()
    assert relative_error(patched.weight.grad, _expected(plain, pixels)) <= 1e-9 or plain.weight.grad.abs().max() == 0


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_degenerate_batches_in_float32(batch):
    """float32 Gram + float64 solve: finite, and close to the float64 closed form even for [0, 255] pixels."""
    torch.manual_seed(1)
    plain, patched, pixels = _both_grads(BATCHES[batch]())
    assert torch.isfinite(patched.weight.grad).all()
    expected = _expected(plain, pixels)
    if expected.abs().max() > 0:
        assert relative_error(patched.weight.grad, expected) <= 1e-3


def test_all_zero_images_give_the_plain_zero_gradient():
    _, patched, _ = _both_grads(torch.zeros(2, 3, 8, 8))
    assert torch.equal(patched.weight.grad, torch.zeros_like(patched.weight.grad))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_pixels_behave_like_plain_training(bad_value):
    """A non-finite pixel makes the plain weight gradient non-finite; TrAct's is non-finite too,
    without raising, so loss-scaling / NaN-skipping logic sees the same thing as without TrAct."""
    pixels = torch.randn(4, 3, 8, 8)
    pixels[1, 0, 2, 3] = bad_value
    plain, patched, _ = _both_grads(pixels)
    assert not torch.isfinite(plain.weight.grad).all()
    assert not torch.isfinite(patched.weight.grad).all()


def test_float32_solve_option_matches_default_for_standardized_inputs():
    torch.manual_seed(0)
    plain = _stem()
    fast = apply_tract(copy.deepcopy(plain), solve_dtype=torch.float32)
    default = apply_tract(copy.deepcopy(plain))
    pixels = torch.randn(4, 3, 8, 8)
    upstream = torch.randn_like(plain(pixels))
    fast(pixels).backward(upstream)
    default(pixels).backward(upstream)
    assert relative_error(fast.weight.grad, default.weight.grad) <= 1e-5


def test_gradient_accumulation_over_micro_batches():
    """Each micro-batch is preconditioned with its own Gram (like BatchNorm statistics)."""
    torch.manual_seed(0)
    plain = _stem()
    patched = apply_tract(copy.deepcopy(plain))
    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    expected = torch.zeros_like(plain.weight)
    for pixels in batches:
        plain.zero_grad()
        plain(pixels).square().mean().backward()
        expected += _expected(plain, pixels)
        patched(pixels).square().mean().backward()
    assert relative_error(patched.weight.grad, expected) <= 1e-5


def test_threads_train_independent_models():
    """No module-level mutable state: two models trained in two threads get their own gradients."""
    import threading

    results = {}

    def work(seed):
        torch.manual_seed(seed)
        plain = _stem()
        patched = apply_tract(copy.deepcopy(plain))
        pixels = torch.randn(3, 3, 8, 8)
        for layer in (plain, patched):
            layer(pixels).sum().backward()
        results[seed] = relative_error(patched.weight.grad, _expected(plain, pixels))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and max(results.values()) <= 1e-5
