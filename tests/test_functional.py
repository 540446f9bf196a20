"""The maths of hf_tract/functional.py: patch Gram (chunked), primal and Woodbury solves, solve precision, fallbacks."""


import torch

from hf_tract import functional as tf

from tests.conftest import conv_stem
from tests.oracle import relative_error


def test_gram_chunking_is_exact():
    layer = conv_stem().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    geometry = tf.PatchGeometry.conv(layer.kernel_size, layer.stride, layer.padding)
    whole = tf.patch_gram(x, geometry)
    chunked = tf.patch_gram(x, geometry, chunk_elements=1)
    assert relative_error(chunked, whole) <= 1e-13


def test_woodbury_and_primal_forms_agree():
    torch.manual_seed(0)
    patches = torch.randn(2, 7, 20, dtype=torch.float64)
    grad = torch.randn(6, 20, dtype=torch.float64)  # 2 groups of 3 outputs
    gram = patches.transpose(1, 2) @ patches
    primal = tf.precondition_with_gram(grad, gram, 7, 0.1)
    woodbury = tf.precondition_with_patches(grad, patches, 0.1)
    assert relative_error(woodbury, primal) <= 1e-10


def test_non_finite_gram_does_not_raise():
    grad = torch.randn(4, 9)
    gram = torch.full((1, 9, 9), float("nan"))
    result = tf.precondition_with_gram(grad, gram, 10, 0.1)
    assert result.shape == grad.shape


def test_default_solve_precision_follows_the_condition_bound():
    from hf_tract.functional import PatchGeometry, default_solve_dtype, patch_gram

    geometry = PatchGeometry.conv((4, 4), 4)
    standardized = torch.randn(8, 3, 16, 16)
    raw_pixels = torch.randint(0, 256, (8, 3, 16, 16)).float()
    rows = 8 * 16
    assert default_solve_dtype(patch_gram(standardized, geometry), rows, 0.1) == torch.float32
    assert default_solve_dtype(patch_gram(raw_pixels, geometry), rows, 0.1) == torch.float64
    assert default_solve_dtype(patch_gram(standardized.double(), geometry), rows, 0.1) == torch.float64


def test_failed_float32_factorization_falls_back_to_a_stable_solve():
    """A forced float32 solve of an ill-conditioned Gram (near-constant pixels ~1e4, λ = 0.1) fails to factorize;
    the CPU fallback solves it again (float64 eigendecomposition) instead of crashing or degrading."""
    from hf_tract.functional import PatchGeometry, patch_gram, precondition_with_gram

    torch.manual_seed(0)
    geometry = PatchGeometry.conv((4, 4), 4)
    x = 1e4 + torch.randn(4, 3, 16, 16)
    gram = patch_gram(x, geometry)
    regularized = gram.to(torch.float32) / 64 + 0.1 * torch.eye(48)
    assert (torch.linalg.cholesky_ex(regularized)[1] != 0).any(), "the case must make float32 Cholesky fail"
    grad = torch.randn(5, 3, 4, 4)
    result = precondition_with_gram(grad, gram, 64, 0.1, solve_dtype=torch.float32)
    expected = precondition_with_gram(grad.double(), gram.double(), 64, 0.1, solve_dtype=torch.float64)
    assert torch.isfinite(result).all()
    assert relative_error(result, expected) <= 1e-3
