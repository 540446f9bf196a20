"""`hf_tract.geometry`: `PatchGeometry.of(layer)` against torch's own convolution output and `F.unfold`, and the
per-step cost model (`gram_size`, `step_cost`) against hand calculations for ViT-B/16 and the ResNet-50 stem."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_tract import apply_tract
from hf_tract.functional import patch_matrix
from hf_tract.geometry import PatchGeometry, gram_size, step_cost


# (layer, input shape): every layer type, padding form and padding mode the geometry must reproduce.
LAYERS = {
    "linear_tokens": (lambda: nn.Linear(12, 5), (2, 7, 12)),
    "linear_flat": (lambda: nn.Linear(12, 5), (3, 12)),
    "conv1d_stride_pad": (lambda: nn.Conv1d(3, 4, 5, stride=2, padding=1), (2, 3, 17)),
    "conv1d_same_even_kernel": (lambda: nn.Conv1d(2, 4, 4, padding="same"), (2, 2, 9)),
    "conv2d_patchify": (lambda: nn.Conv2d(3, 8, 4, stride=4), (2, 3, 16, 16)),
    "conv2d_stem_7x7_2": (lambda: nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), (2, 3, 19, 21)),
    "conv2d_rect_dilated": (lambda: nn.Conv2d(2, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 3)), (2, 2, 13, 11)),
    "conv2d_groups": (lambda: nn.Conv2d(6, 9, 3, padding=1, groups=3), (2, 6, 8, 8)),
    "conv2d_valid": (lambda: nn.Conv2d(3, 4, 3, padding="valid"), (2, 3, 9, 10)),
    "conv2d_same_dilated": (lambda: nn.Conv2d(3, 4, 4, padding="same", dilation=2), (2, 3, 10, 9)),
    "conv2d_reflect": (lambda: nn.Conv2d(3, 4, 3, padding=2, padding_mode="reflect"), (2, 3, 8, 8)),
    "conv2d_replicate": (lambda: nn.Conv2d(3, 4, 5, stride=3, padding=1, padding_mode="replicate"), (2, 3, 11, 12)),
    "conv2d_circular": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (2, 3, 7, 7)),
    "conv2d_unbatched": (lambda: nn.Conv2d(3, 4, 3, stride=2), (3, 9, 9)),
    "conv3d_tubelet": (lambda: nn.Conv3d(3, 8, (2, 4, 4), stride=(2, 4, 4)), (2, 3, 4, 8, 8)),
    "conv3d_pad_groups": (lambda: nn.Conv3d(4, 4, 3, stride=(1, 2, 2), padding=1, groups=2), (1, 4, 5, 7, 6)),
}


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_of_layer_matches_the_layer_output_and_patch_matrix(case):
    build, shape = LAYERS[case]
    layer = build()
    x = torch.randn(shape)
    geometry = PatchGeometry.of(layer)
    out = layer(x)
    n, groups = gram_size(layer)
    assert (n, groups) == (layer.weight[0].numel(), getattr(layer, "groups", 1))
    if isinstance(layer, nn.Linear):
        assert geometry == PatchGeometry.linear()
        expected_rows = out.numel() // layer.out_features
    else:
        assert geometry.spatial_dims == len(layer.kernel_size) and geometry.groups == layer.groups
        assert geometry.output_size(shape[-geometry.spatial_dims :]) == tuple(out.shape[-geometry.spatial_dims :])
        expected_rows = out.numel() // layer.out_channels
    assert geometry.num_rows(shape) == expected_rows
    assert patch_matrix(x, geometry).shape == (groups, expected_rows, n)


@pytest.mark.parametrize("case", sorted(k for k in LAYERS if k.startswith("conv2d") and "unbatched" not in k))
def test_rows_equal_the_unfold_row_count(case):
    build, shape = LAYERS[case]
    layer = build()
    geometry = PatchGeometry.of(layer)
    x = torch.randn(shape)
    amounts = geometry.pad_amounts()
    padded = F.pad(x, [p for pair in reversed(amounts) for p in pair])  # F.unfold pads only symmetrically
    unfolded = F.unfold(padded, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
    assert unfolded.shape[1] == layer.in_channels * math.prod(layer.kernel_size)
    assert geometry.num_rows(shape) == shape[0] * unfolded.shape[2]


def test_of_a_patched_layer_is_the_plain_layer_geometry():
    plain = nn.Conv2d(3, 8, 7, stride=2, padding=3, padding_mode="reflect")
    patched = apply_tract(nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3, padding_mode="reflect")), target="0")[0]
    assert type(patched) is not nn.Conv2d
    assert PatchGeometry.of(patched) == PatchGeometry.of(plain) == PatchGeometry.conv((7, 7), 2, 3, 1, 1, "reflect")


@pytest.mark.parametrize("layer", [nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(3), nn.Embedding(4, 3)])
def test_unsupported_layers_raise_type_error(layer):
    with pytest.raises(TypeError, match="nn.Linear and nn.Conv1d/2d/3d"):
        PatchGeometry.of(layer)
    with pytest.raises(TypeError):
        step_cost(layer, 1)


def test_step_cost_vit_b16_by_hand():
    # ViT-B/16 @224, batch 128: Conv2d(3, 768, 16, stride 16); n = 3*16*16 = 768, 14*14 = 196 patches per image,
    # N = 128*196 = 25088. Gram 2*N*n^2 = 2*25088*589824 = 29_595_009_024; solve n^3/3 + 2*n^2*768 =
    # 150_994_944 + 905_969_664 = 1_056_964_608; layer 6*N*n*768 = 88_785_027_072; Gram memory 4*768^2 bytes.
    layer = nn.Conv2d(3, 768, 16, stride=16)
    rows = 128 * PatchGeometry.of(layer).num_rows((1, 3, 224, 224))
    cost = step_cost(layer, rows)
    assert (cost.n, cost.groups, cost.patch_rows) == (768, 1, 25088)
    assert cost.gram_flops == 29_595_009_024
    assert cost.solve_flops == 1_056_964_608
    assert cost.layer_train_flops == 88_785_027_072
    assert cost.gram_bytes == 2_359_296


def test_step_cost_resnet50_stem_by_hand():
    # ResNet-50 stem @224, batch 128: Conv2d(3, 64, 7, stride 2, padding 3); n = 3*7*7 = 147,
    # (224 + 6 - 7) // 2 + 1 = 112 -> 12544 positions per image, N = 1_605_632. Gram 2*N*147^2 =
    # 69_392_203_776; solve 147^3/3 + 2*147^2*64 = 1_058_841 + 2_765_952 = 3_824_793;
    # layer 6*N*147*64 = 90_634_715_136; Gram memory 4*147^2 = 86_436 bytes.
    layer = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    rows = 128 * PatchGeometry.of(layer).num_rows((1, 3, 224, 224))
    cost = step_cost(layer, rows)
    assert (cost.n, cost.groups, cost.patch_rows) == (147, 1, 1_605_632)
    assert cost.gram_flops == 69_392_203_776
    assert cost.solve_flops == 3_824_793
    assert cost.layer_train_flops == 90_634_715_136
    assert cost.gram_bytes == 86_436


def test_step_cost_grouped_conv_counts_one_gram_per_group():
    # Conv2d(6, 12, 3, groups=3): n = 2*9 = 18 per group, out/groups = 4; N = 10.
    cost = step_cost(nn.Conv2d(6, 12, 3, groups=3), 10)
    assert (cost.n, cost.groups) == (18, 3)
    assert cost.gram_flops == 3 * 2 * 10 * 18 * 18
    assert cost.solve_flops == 3 * (18**3 / 3 + 2 * 18 * 18 * 4)
    assert cost.layer_train_flops == 6 * 10 * 18 * 4 * 3
    assert cost.gram_bytes == 4 * 3 * 18 * 18


def test_inspect_grouped_conv_gram_size():
    from hf_tract.geometry import gram_size

    assert gram_size(torch.nn.Conv2d(6, 12, kernel_size=3, groups=3)) == (2 * 9, 3)
    assert gram_size(torch.nn.Conv1d(4, 8, kernel_size=5)) == (20, 1)
    assert gram_size(torch.nn.Linear(48, 7)) == (48, 1)
