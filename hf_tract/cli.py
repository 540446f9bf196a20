"""The `hf-tract` command line.

`hf-tract inspect MODEL` shows which layer(s) TrAct would train, their shapes, the size `n` of the patch
Gram matrix and the extra work per training step, without training or downloading weights: MODEL is a Hub
model id, a local checkpoint folder or a model type (`vit`, `convnext`, `resnet`, ...), and only its
config is read; the model is built from that config with random weights.

Example:

```bash
hf-tract inspect vit --batch_size 128
hf-tract inspect google/vit-base-patch16-224 --image_size 384
hf-tract inspect ./my-checkpoint --json
```
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .targets import find_first_layers


@dataclass
class FirstLayerReport:
    """What TrAct would do to one layer, and what it costs per training step.

    Args:
        name: Dotted module name, as `apply_tract(model, target=name)` takes it.
        layer_class: The layer's class.
        weight_shape: Shape of its weight.
        groups: Number of groups of a grouped convolution (1 otherwise); there is one Gram per group.
        n: Size of the (n x n) patch Gram: `in_channels / groups * prod(kernel_size)`, or `in_features`.
        patch_rows_per_image: Rows of the patch matrix A per image (the layer's output positions).
        patch_rows_per_step: Rows N of A in one step (`batch_size * patch_rows_per_image`).
        gram_gflops: FLOPs of the Gram `A^T A` per step, in GFLOPs.
        solve_gflops: FLOPs of the Cholesky factorization and solve per step, in GFLOPs.
        layer_train_gflops: FLOPs of the layer's own forward + backward per step, in GFLOPs.
        gram_bytes: Memory of the fp32 Gram matrices.
    """

    name: str
    layer_class: str
    weight_shape: list[int]
    groups: int
    n: int
    patch_rows_per_image: int
    patch_rows_per_step: int
    gram_gflops: float
    solve_gflops: float
    layer_train_gflops: float
    gram_bytes: int


def gram_size(layer: nn.Module) -> tuple[int, int]:
    """`(n, groups)`: the Gram size of a Linear / ConvNd layer and its number of groups."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, 1
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.in_channels // layer.groups * math.prod(layer.kernel_size), layer.groups
    raise TypeError(f"TrAct supports nn.Linear and nn.Conv1d/2d/3d layers, not {type(layer).__name__}")


def _config_of(model: nn.Module):
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) or config


def example_pixels(model: nn.Module, image_size: int | None = None) -> torch.Tensor:
    """One random image of the size the model's config says (or `image_size`, or 224)."""
    config = _config_of(model)
    size = image_size or getattr(config, "image_size", None) or 224
    height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    return torch.randn(1, getattr(config, "num_channels", 3), height, width)


def inspect_model(
    model: nn.Module, batch_size: int = 128, image_size: int | None = None
) -> tuple[list[FirstLayerReport], float | None]:
    """Describe the layers TrAct would train, from one no-grad forward pass on a random image.

    Args:
        model: The model (plain, not patched).
        batch_size: Images per training step (per process) for the cost estimate.
        image_size: Input side in pixels (default: the config's `image_size`, else 224).

    Returns:
        `(reports, model_train_gflops)`: one [`FirstLayerReport`] per layer, and the whole model's training
        FLOPs per step (3x the forward FLOPs counted by `torch.utils.flop_counter`), `None` when the forward
        pass failed (then the number of patch rows is derived from the layer alone where possible).
    """
    from torch.utils.flop_counter import FlopCounterMode

    layers = find_first_layers(model)
    rows_per_image: dict[str, int] = {}

    def record(name):
        def hook(module, args, output):
            x = args[0]
            if isinstance(module, nn.Linear):
                rows_per_image[name] = x.numel() // x.shape[-1] // pixels.shape[0]
            else:
                rows_per_image[name] = math.prod(output.shape[2:])

        return hook

    pixels = example_pixels(model, image_size)
    handles = [module.register_forward_hook(record(name)) for name, module in layers]
    model_forward_flops = None
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            if hasattr(model, "main_input_name"):
                model(**{model.main_input_name: pixels})
            else:
                model(pixels)
        model_forward_flops = counter.get_total_flops()
    except Exception as error:  # any model-specific input requirement: fall back to the layer alone
        print(f"note: the example forward pass failed ({error!r}); patch rows estimated from the layer", file=sys.stderr)
    finally:
        for handle in handles:
            handle.remove()

    reports = []
    for name, layer in layers:
        n, groups = gram_size(layer)
        out_per_group = layer.weight.shape[0] // groups
        rows = rows_per_image.get(name)
        if rows is None:
            rows = _rows_from_geometry(layer, pixels.shape[2:])
        rows_per_step = batch_size * rows
        reports.append(
            FirstLayerReport(
                name=name,
                layer_class=type(layer).__name__,
                weight_shape=list(layer.weight.shape),
                groups=groups,
                n=n,
                patch_rows_per_image=rows,
                patch_rows_per_step=rows_per_step,
                gram_gflops=2 * groups * rows_per_step * n * n / 1e9,
                # Cholesky (n^3/3) plus the two triangular solves for out/groups right-hand sides, per group.
                solve_gflops=groups * (n**3 / 3 + 2 * n * n * out_per_group) / 1e9,
                # Forward 2*N*n*out plus a backward twice that (input and weight gradients).
                layer_train_gflops=6 * rows_per_step * n * out_per_group * groups / 1e9,
                gram_bytes=4 * groups * n * n,
            )
        )
    model_train_gflops = None if model_forward_flops is None else 3 * batch_size * model_forward_flops / 1e9
    return reports, model_train_gflops


def _rows_from_geometry(layer: nn.Module, spatial: tuple[int, ...]) -> int:
    """Output positions of a conv for an input of spatial size `spatial` (1 for a Linear on pooled input)."""
    if isinstance(layer, nn.Linear):
        return 1
    spatial = spatial[-len(layer.kernel_size) :]
    if layer.padding == "same":
        return math.prod(spatial)
    padding = (0,) * len(spatial) if layer.padding == "valid" else layer.padding
    return math.prod(
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, k, p, d, st in zip(spatial, layer.kernel_size, padding, layer.dilation, layer.stride)
    )


def load_model_for_inspection(model: str, trust_remote_code: bool = False, revision: str | None = None) -> nn.Module:
    """Build a model with random weights from a local folder's, a Hub repository's or a model type's config.

    Only the config is read (no weights are downloaded). Code from the Hub runs only with
    `trust_remote_code=True`.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not os.path.isdir(model) and model in CONFIG_MAPPING:
        config = AutoConfig.for_model(model)
    else:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code, revision=revision)
    try:
        return AutoModelForImageClassification.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError:
        # Not an image classifier (CLIP, DINOv2 backbones, ...): the base model has the same first layer.
        return AutoModel.from_config(config, trust_remote_code=trust_remote_code)


def _format_report(model_name: str, reports, model_train_gflops, lambda_: float, batch_size: int) -> str:
    lines = [f"TrAct would train {len(reports)} layer(s) of {model_name} (lambda={lambda_}, batch size {batch_size}):"]
    for report in reports:
        lines += [
            f"  {report.name}",
            f"    class {report.layer_class}, weight {tuple(report.weight_shape)}, groups {report.groups}",
            f"    n (Gram size) {report.n}: {report.groups} Gram(s) of {report.n}x{report.n} "
            f"({report.gram_bytes / 1024:.1f} KiB fp32)",
            f"    patch rows: {report.patch_rows_per_image} per image, N = {report.patch_rows_per_step} per step",
            f"    extra work per step: Gram {report.gram_gflops:.3f} GFLOP + solve {report.solve_gflops:.4f} GFLOP "
            f"(the layer's own forward+backward: {report.layer_train_gflops:.3f} GFLOP)",
        ]
    extra = sum(r.gram_gflops + r.solve_gflops for r in reports)
    if model_train_gflops:
        lines.append(
            f"Model forward+backward: ~{model_train_gflops:.1f} GFLOP per step; TrAct adds {extra:.3f} GFLOP "
            f"({100 * extra / model_train_gflops:.2f}%). Wall-clock overhead also depends on kernel launches "
            "(small models) and is best measured."
        )
    names = [r.name for r in reports]
    target = repr(names[0]) if len(names) == 1 else repr(names)
    lines.append(f"Python: apply_tract(model, lambda_={lambda_}, target={target})")
    return "\n".join(lines)


def inspect_command(args: argparse.Namespace) -> int:
    if not args.tract_lambda > 0:
        raise SystemExit(f"--lambda must be > 0, got {args.tract_lambda}")
    model = load_model_for_inspection(args.model, args.trust_remote_code, args.revision)
    reports, model_train_gflops = inspect_model(model, args.batch_size, args.image_size)
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "model_class": type(model).__name__,
                    "lambda": args.tract_lambda,
                    "batch_size": args.batch_size,
                    "model_train_gflops": model_train_gflops,
                    "layers": [asdict(r) for r in reports],
                },
                indent=2,
            )
        )
    else:
        print(_format_report(f"{args.model} ({type(model).__name__})", reports, model_train_gflops, args.tract_lambda, args.batch_size))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-tract", description="TrAct for Hugging Face vision models.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect",
        help="show the layer(s) TrAct would train and the extra work per step (no training, no weights)",
        description=__doc__.split("\n\n")[1],
    )
    inspect.add_argument("model", help="Hub model id, local checkpoint folder, or model type (e.g. vit, convnext)")
    inspect.add_argument("--lambda", dest="tract_lambda", type=float, default=0.1, help="TrAct lambda (default 0.1)")
    inspect.add_argument("--batch_size", type=int, default=128, help="images per step for the cost estimate")
    inspect.add_argument("--image_size", type=int, default=None, help="input side (default: from the config)")
    inspect.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    inspect.add_argument(
        "--trust_remote_code", action="store_true", help="allow code from the Hub repository to run (off by default)"
    )
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(handler=inspect_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-tract` console script."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
