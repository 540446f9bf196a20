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
import contextlib
import difflib
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .config import TrActConfig
from .environment import HubUnreachableError, check_hub_reachable, hub_offline
from .geometry import PatchGeometry, step_cost
from .probe_inputs import candidate_inputs
from .targets import find_first_layers


class InspectError(Exception):
    """An error `hf-tract inspect` reports as one line (exit code 2)."""


@dataclass
class FirstLayerReport:
    """What TrAct would do to one layer, and what it costs per training step.

    Args:
        name (`str`): Dotted module name, as `apply_tract(model, target=name)` takes it.
        layer_class (`str`): The layer's class.
        weight_shape (`list[int]`): Shape of its weight.
        groups (`int`): Number of groups of a grouped convolution (1 otherwise); there is one Gram per group.
        n (`int`): Size of the (n x n) patch Gram: `in_channels / groups * prod(kernel_size)`, or `in_features`.
        patch_rows_per_image (`int`): Rows of the patch matrix A per image (the layer's output positions).
        patch_rows_per_step (`int`): Rows N of A in one step (`batch_size * patch_rows_per_image`).
        gram_gflops (`float`): FLOPs of the Gram `A^T A` per step, in GFLOPs.
        solve_gflops (`float`): FLOPs of the Cholesky factorization and solve per step, in GFLOPs.
        layer_train_gflops (`float`): FLOPs of the layer's own forward + backward per step, in GFLOPs.
        gram_bytes (`int`): Memory of the fp32 Gram matrices.
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


def inspect_model(
    model: nn.Module, batch_size: int = 128, image_size: int | None = None, quiet: bool = False
) -> tuple[list[FirstLayerReport], float | None]:
    """Describe the layers TrAct would train, from one no-grad forward pass on a random image.

    Args:
        model: The model (plain, not patched).
        batch_size: Images per training step (per process) for the cost estimate.
        image_size: Input side in pixels (default: the config's `image_size`, else 224).
        quiet: Do not print a note when no example forward ran.

    Returns:
        `(reports, model_train_gflops)`: one [`FirstLayerReport`] per layer, and the whole model's training
        FLOPs per step (3x the forward FLOPs counted by `torch.utils.flop_counter`), `None` when the forward
        pass failed (then the number of patch rows is derived from the layer alone where possible).
    """
    from torch.utils.flop_counter import FlopCounterMode

    layers = find_first_layers(model)
    rows_per_image: dict[str, int] = {}
    images = 1  # the example inputs hold one image / video

    def record(name):
        def hook(module, args, output):
            if args and isinstance(args[0], torch.Tensor):
                rows_per_image[name] = PatchGeometry.of(module).num_rows(args[0].shape) // images

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in layers]
    model_forward_flops, error, pixels, forward_ran = None, None, None, False
    was_training = model.training
    model.eval()
    try:
        for candidate in candidate_inputs(model, image_size=image_size, towers=False):
            rows_per_image.clear()
            pixels = pixels if pixels is not None else candidate.pixels[0]
            try:
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    candidate.run(model)
                model_forward_flops = counter.get_total_flops()
            except Exception as exc:  # noqa: BLE001 - model-specific input requirement: try the next one
                error = error or exc
                # Some forwards run but not under the FLOP counter's module tracker: rows without FLOPs.
                rows_per_image.clear()
                try:
                    with torch.no_grad():
                        candidate.run(model)
                except Exception:  # noqa: BLE001
                    continue
            forward_ran, pixels = True, candidate.pixels[0]
            break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not forward_ran and not quiet:
        print(
            f"note: no example forward pass ran ({type(error).__name__ if error else 'no input'}: {error}); "
            "patch rows estimated from the layer",
            file=sys.stderr,
        )

    reports = []
    for name, layer in layers:
        rows = rows_per_image.get(name)
        if rows is None:
            rows = _rows_from_geometry(layer, pixels, image_size)
        cost = step_cost(layer, batch_size * rows)
        reports.append(
            FirstLayerReport(
                name=name,
                layer_class=type(layer).__name__,
                weight_shape=list(layer.weight.shape),
                groups=cost.groups,
                n=cost.n,
                patch_rows_per_image=rows,
                patch_rows_per_step=cost.patch_rows,
                gram_gflops=cost.gram_flops / 1e9,
                solve_gflops=cost.solve_flops / 1e9,
                layer_train_gflops=cost.layer_train_flops / 1e9,
                gram_bytes=cost.gram_bytes,
            )
        )
    model_train_gflops = None if model_forward_flops is None else 3 * batch_size * model_forward_flops / 1e9
    return reports, model_train_gflops


def _rows_from_geometry(layer: nn.Module, pixels: torch.Tensor | None, image_size: int | None) -> int:
    """Patch rows of one image for a conv fed the image directly (1 for a Linear on pooled input)."""
    if isinstance(layer, nn.Linear):
        return 1
    side = image_size or 224
    spatial = pixels.shape[-len(layer.kernel_size) :] if pixels is not None else (side,) * len(layer.kernel_size)
    return PatchGeometry.of(layer).num_rows((1, layer.in_channels, *spatial))


def load_config_for_inspection(model: str, trust_remote_code: bool = False, revision: str | None = None):
    """The config of a local folder, a known transformers model type, or a Hub repository, in that order.

    A name that is neither a folder, nor a model type, nor an `owner/name` Hub id fails at once with
    the closest model types (no Hub call); with `HF_HUB_OFFLINE=1` only cached Hub configs are read.

    Raises:
        InspectError: With one line saying what was tried and what to do.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if os.path.isdir(model):
        try:
            return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - reported as one line
            raise InspectError(f"{model!r} is a folder but has no readable config.json ({type(exc).__name__}: {exc})") from None
    if model in CONFIG_MAPPING:
        return AutoConfig.for_model(model)
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or os.path.exists(model):
        raise InspectError(f"{model!r} is not a folder with a config.json (nor a model type or an owner/name Hub id)")
    if "/" not in model:
        close = difflib.get_close_matches(model.lower(), list(CONFIG_MAPPING.keys()), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise InspectError(
            f"{model!r} is not a local folder, a transformers model type or a Hub id (owner/name); {hint}"
            "see `python -c \"from transformers import CONFIG_MAPPING; print(sorted(CONFIG_MAPPING))\"` for model types"
        )
    try:
        check_hub_reachable(model)
    except HubUnreachableError as exc:
        raise InspectError(str(exc)) from None
    try:
        return AutoConfig.from_pretrained(
            model, trust_remote_code=trust_remote_code, revision=revision, local_files_only=hub_offline()
        )
    except Exception as exc:  # noqa: BLE001 - Hub / network / remote-code errors, reported as one line
        where = " (HF_HUB_OFFLINE is set: only configs already in the local cache can be read)" if hub_offline() else ""
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InspectError(f"could not read the config of {model!r}{where}: {type(exc).__name__}: {first_line}") from None


def load_model_for_inspection(
    model: str, trust_remote_code: bool = False, revision: str | None = None, device: str | None = "meta"
) -> nn.Module:
    """Build a model from a local folder's, a model type's or a Hub repository's config.

    Only the config is read (no weights are downloaded). Code from the Hub runs only with
    `trust_remote_code=True`. The class is the image-classification head, else the video-classification
    head, else the base model: the `target=` reported is a path in that class. On the `meta` device
    (the default) no memory is allocated and the example forward computes shapes and FLOPs only.

    Raises:
        InspectError: If the config cannot be read or no model class can be built from it.
    """
    from transformers import AutoModel, AutoModelForImageClassification, AutoModelForVideoClassification

    config = load_config_for_inspection(model, trust_remote_code, revision)
    for auto in (AutoModelForImageClassification, AutoModelForVideoClassification, AutoModel):
        try:
            with torch.device(device) if device else contextlib.nullcontext():
                return auto.from_config(config, trust_remote_code=trust_remote_code)
        except ValueError:  # not a class of this auto mapping: the next one
            continue
        except Exception as exc:  # noqa: BLE001 - reported as one line
            raise InspectError(f"could not build {type(config).__name__} ({type(exc).__name__}: {exc})") from None
    raise InspectError(
        f"{type(config).__name__} is not an image or video classifier nor a base model of transformers' Auto "
        "classes; build the model in Python and call hf_tract.find_first_layers(model)"
    )


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


def _check_lambda(value: float | None) -> float:
    try:
        return TrActConfig(**TrActConfig.given(lambda_=value)).lambda_
    except (TypeError, ValueError) as exc:
        raise InspectError(f"--lambda: {exc}") from None


def inspect_command(args: argparse.Namespace) -> int:
    args.tract_lambda = _check_lambda(args.tract_lambda)
    model = load_model_for_inspection(args.model, args.trust_remote_code, args.revision)
    reports, model_train_gflops = inspect_model(model, args.batch_size, args.image_size, quiet=True)
    if model_train_gflops is None:  # a forward that needs real values (data-dependent shapes): on CPU
        model = load_model_for_inspection(args.model, args.trust_remote_code, args.revision, device=None)
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


def _positive_int(value: str) -> int:
    """argparse type of counts and sizes: a whole number >= 1 (argparse names the option in its message)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {number}")
    return number


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (exit code 2), like every other error of the command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-tract", description="TrAct for Hugging Face vision models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    inspect = commands.add_parser(
        "inspect",
        help="show the layer(s) TrAct would train and the extra work per step (no training, no weights)",
        description=__doc__.split("\n\n")[1],
    )
    inspect.add_argument("model", help="Hub model id, local checkpoint folder, or model type (e.g. vit, convnext)")
    inspect.add_argument(
        "--lambda", dest="tract_lambda", type=float, default=None, help=f"TrAct lambda (default {TrActConfig().lambda_})"
    )
    inspect.add_argument("--batch_size", type=_positive_int, default=128, help="images per step for the cost estimate")
    inspect.add_argument("--image_size", type=_positive_int, default=None, help="input side (default: from the config)")
    inspect.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    inspect.add_argument(
        "--trust_remote_code", action="store_true", help="allow code from the Hub repository to run (off by default)"
    )
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(handler=inspect_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-tract` console script.

    Returns:
        `int`: 0 on success, 2 on any error (reported as one line on stderr, never a traceback).
    """
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except InspectError as exc:
        message = str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure: one line, not a traceback
        first_line = (str(exc).strip().splitlines() or [""])[0]
        message = f"{type(exc).__name__}: {first_line}"
    print(f"hf-tract: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "FirstLayerReport",
    "InspectError",
    "build_parser",
    "inspect_command",
    "inspect_model",
    "load_config_for_inspection",
    "load_model_for_inspection",
    "main",
]
