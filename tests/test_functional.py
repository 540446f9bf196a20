"""The maths of `hf_tract.functional`: the patch Gram (chunked), primal and Woodbury solves, the solve's
precision and fallbacks, the full-precision weight gradient (`weight_gradient`) against torch's float64
convolution backward, and the refined float32 solve (`solve_dtype="float32_refined"`) against float64."""

import copy
import math

import pytest
import torch
from torch import nn

from hf_tract import TrActConfig
from hf_tract import functional as tf
from hf_tract.config import SOLVE_DTYPE_CHOICES
from hf_tract.geometry import PatchGeometry

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


# ---------------------------------------------------------------- full-precision weight gradient and refined solve


LAYERS = {
    "linear_3d": (lambda: nn.Linear(12, 5), (3, 20, 12)),
    "conv1d_circular": (lambda: nn.Conv1d(2, 4, 3, padding=2, padding_mode="circular"), (3, 2, 17)),
    "conv2d_patchify": (lambda: nn.Conv2d(3, 8, 4, stride=4), (4, 3, 16, 16)),
    "conv2d_stem": (lambda: nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), (2, 3, 20, 20)),
    "conv2d_dilated_same": (lambda: nn.Conv2d(2, 6, 4, padding="same", dilation=2), (3, 2, 11, 10)),
    "conv2d_groups_reflect": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect"), (3, 4, 10, 9)),
    "conv2d_unbatched": (lambda: nn.Conv2d(3, 4, 3), (3, 9, 9)),
    "conv3d_groups": (lambda: nn.Conv3d(2, 4, 3, stride=2, padding=1, groups=2), (2, 2, 6, 7, 6)),
}


def _float64_weight_grad(layer, x, upstream):
    layer = copy.deepcopy(layer).double()
    layer(x.double()).backward(upstream.double())
    return layer.weight.grad


@pytest.mark.parametrize("chunk_elements", [tf.DEFAULT_CHUNK_ELEMENTS, 1])  # one chunk; one image per chunk
@pytest.mark.parametrize("case", sorted(LAYERS))
def test_weight_gradient_matches_the_float64_backward(case, chunk_elements):
    build, shape = LAYERS[case]
    torch.manual_seed(0)
    layer = build()
    x = torch.randn(shape)
    upstream = torch.randn_like(layer(x)).bfloat16()  # what autocast hands down: exactly representable in float32
    grad = tf.weight_gradient(upstream, x, PatchGeometry.of(layer), chunk_elements)
    assert grad.dtype == torch.float32 and grad.shape == layer.weight.shape
    assert relative_error(grad, _float64_weight_grad(layer, x, upstream)) <= 1e-6
    grad64 = tf.weight_gradient(upstream.double(), x.double(), PatchGeometry.of(layer), chunk_elements)
    assert grad64.dtype == torch.float64
    assert relative_error(grad64, _float64_weight_grad(layer, x, upstream)) <= 1e-12


def test_weight_gradient_ignores_autocast():
    layer, x = nn.Conv2d(3, 8, 3, padding=1), torch.randn(2, 3, 8, 8)
    upstream = torch.randn(2, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grad = tf.weight_gradient(upstream, x, PatchGeometry.of(layer))
    assert grad.dtype == torch.float32
    assert relative_error(grad, _float64_weight_grad(layer, x, upstream)) <= 1e-6


def _spd(n, top_eigenvalue, seed=0):
    """A symmetric positive definite float64 matrix with eigenvalues log-spaced in [1, top_eigenvalue]."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.logspace(0, math.log10(top_eigenvalue), n, dtype=torch.float64)) @ q.T


@pytest.mark.parametrize("condition", [1e3, 1e5])
def test_one_refinement_step_with_a_float64_residual_reaches_float64_accuracy(condition):
    matrix = _spd(96, condition).unsqueeze(0)
    rhs = torch.randn(1, 96, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).float()
    exact = torch.linalg.solve(matrix, rhs.double())
    plain, info = tf.refined_cholesky_solve(matrix, rhs, steps=0)
    refined, _ = tf.refined_cholesky_solve(matrix, rhs)
    float32_residual, _ = tf.refined_cholesky_solve(matrix, rhs, residual_dtype=torch.float32)
    assert int(info.sum()) == 0 and refined.dtype == torch.float32
    # float32 rounding of the result is the floor (~6e-8); the plain float32 solve is ~condition * 6e-8 off, and a
    # float32 residual (as large as its own rounding) does not bring it much closer: float64 is needed.
    assert relative_error(refined, exact) <= 3e-7
    assert relative_error(plain, exact) >= 10 * relative_error(refined, exact)
    assert relative_error(float32_residual, exact) >= 5 * relative_error(refined, exact)


def test_float32_refined_option_matches_the_float64_solve_on_unstandardised_pixels():
    # [0, 255] pixels in 4x4 patches (n = 48): condition number ~1e4, where a plain float32 solve loses digits.
    torch.manual_seed(0)
    x = torch.rand(16, 3, 16, 16) * 255
    geometry = PatchGeometry.conv((4, 4), 4)
    gram, rows = tf.patch_gram(x, geometry), geometry.num_rows(x.shape)
    grad = torch.randn(8, 3, 4, 4)
    reference = tf.precondition_with_gram(grad.double(), gram, rows, 0.1, torch.float64)
    refined = tf.precondition_with_gram(grad, gram, rows, 0.1, tf.FLOAT32_REFINED)
    plain32 = tf.precondition_with_gram(grad, gram, rows, 0.1, torch.float32)
    assert refined.dtype == torch.float32
    assert relative_error(refined, reference) <= 1e-6
    assert relative_error(plain32, reference) >= 10 * relative_error(refined, reference)


def test_float32_refined_solves_grouped_grams_and_all_reduced_row_counts():
    torch.manual_seed(0)
    x = torch.randn(4, 4, 9, 9)
    geometry = PatchGeometry.conv((3, 3), 1, 1, groups=2)
    gram, rows = tf.patch_gram(x, geometry), geometry.num_rows(x.shape)
    grad = torch.randn(6, 2, 3, 3)
    reference = tf.precondition_with_gram(grad.double(), gram, rows, 0.1, torch.float64)
    for num_rows in (rows, torch.tensor(float(rows))):
        refined = tf.precondition_with_gram(grad, gram, num_rows, 0.1, tf.FLOAT32_REFINED)
        assert relative_error(refined, reference) <= 1e-6


def test_float32_refined_woodbury_form_is_the_float64_one():
    patches = torch.randn(1, 5, 40)
    grad = torch.randn(3, 40)
    refined = tf.precondition_with_patches(grad, patches, 0.1, tf.FLOAT32_REFINED)
    assert torch.equal(refined, tf.precondition_with_patches(grad, patches, 0.1, torch.float64))


def test_float32_refined_is_a_config_choice_that_round_trips():
    assert "float32_refined" in SOLVE_DTYPE_CHOICES
    config = TrActConfig(solve_dtype="float32_refined")
    assert config.solve_dtype == tf.FLOAT32_REFINED
    assert config.to_dict()["solve_dtype"] == "float32_refined"
    assert TrActConfig(solve_dtype=config.to_dict()["solve_dtype"]) == config
    assert TrActConfig().solve_dtype is None  # the default is unchanged


def test_failed_refined_factorisation_falls_back_like_the_other_solves():
    gram = torch.full((1, 4, 4), float("nan"))
    grad = torch.randn(2, 4)
    expected = tf.precondition_with_gram(grad, gram, 10, 0.1, torch.float32)
    refined = tf.precondition_with_gram(grad, gram, 10, 0.1, tf.FLOAT32_REFINED)
    assert torch.equal(torch.isnan(refined), torch.isnan(expected))


def test_refinement_reads_the_lower_triangle_like_the_factorisation():
    # A float32 Gram is symmetric only up to rounding: the refined solve must converge to the solution of the
    # matrix the Cholesky factorisation sees (its lower triangle), as the float64 solve does.
    matrix = _spd(24, 1e3).unsqueeze(0)
    skewed = matrix + 1e-4 * torch.randn(1, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).triu(1)
    rhs = torch.randn(1, 24, 3, generator=torch.Generator().manual_seed(3))
    reference = torch.cholesky_solve(rhs.double(), torch.linalg.cholesky(skewed))
    refined, _ = tf.refined_cholesky_solve(skewed, rhs)
    assert relative_error(refined, reference) <= 1e-7
