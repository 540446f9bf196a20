"""Dummy inputs for the first-layer probe, built from a model's forward signature and configs.

[`candidate_inputs`] yields the ways to call a model (batch of one) that the probe ([`hf_tract.probe`]) tries in
turn: which forward arguments take pixels, what size, channel and frame count the images must have (from every
config the model holds, nested ones included, else from sizes the modules carry, else 3×224×224), and small valid
dummies for the text / task / grid arguments some families require. Then the vision towers, each run alone.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn


# The layers whose outputs are features, not pixels: the probe stops following the pixels at them, and a
# vision tower is never one of them.
WEIGHT_LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)

ExampleInputs = Union[torch.Tensor, Mapping[str, Any], Sequence[Any]]

_PIXEL_ARGUMENTS = (
    "pixel_values", "pixel_values_videos", "pixel_values_images", "high_res_pixel_values", "flattened_patches",
    "images", "image", "videos", "video", "x", "input", "inputs", "img", "imgs",
)  # fmt: skip
_NOT_PIXELS = ("pixel_mask", "pixel_attention_mask", "pixel_values_mask")
_GRID_ARGUMENTS = ("grid_thw", "image_grid_thw", "video_grid_thw")
_SIZE_NAMES = ("image_size", "crop_size", "img_size", "input_size")
_CHANNEL_NAMES = ("num_channels", "in_channels", "num_input_channels", "input_channels", "in_chans")
_FRAME_NAMES = ("num_frames", "frames_per_clip", "num_frames_per_clip", "video_frames", "frames", "num_video_frames")
_TEXT_LENGTH = 4
_GRID_SIDE = 4  # patches per side of the dummy image of pre-patchified towers (Qwen2-VL, SigLIP2, ...)
_MAX_TOWERS = 8


@dataclass
class ProbeInput:
    """One way to call a model: `model.get_submodule(module_path)(*args, **kwargs)`.

    Args:
        args (`tuple`): Positional arguments.
        kwargs (`dict`): Keyword arguments.
        pixels (`tuple[torch.Tensor, ...]`): The tensors among them that hold the image(s) / video(s).
        module_path (`str`, *optional*, defaults to `""`): The submodule called (`""`: the model itself; else a
            vision tower run on its own because the whole model cannot run on dummy inputs).
    """

    args: tuple
    kwargs: dict
    pixels: tuple
    module_path: str = ""

    def run(self, model: nn.Module):
        """Calls the model (or the submodule) on these inputs and returns its output."""
        module = model.get_submodule(self.module_path) if self.module_path else model
        return module(*self.args, **self.kwargs)


def _is_config(value) -> bool:
    return type(value).__name__.endswith("Config") and hasattr(value, "to_dict")


def _configs(*modules: nn.Module) -> list:
    """The configs of `modules` and of their submodules, each followed (breadth first) by its nested
    sub-configs (`vision_config`, `backbone_config`, encoder sub-configs, ...), without repeats."""
    roots, seen, ordered = [], set(), []
    for module in modules:
        for sub in module.modules():
            config = getattr(sub, "config", None)
            if _is_config(config) and id(config) not in seen:
                seen.add(id(config))
                roots.append(config)
    queue = list(roots)
    seen = set()
    while queue:
        config = queue.pop(0)
        if id(config) in seen:
            continue
        seen.add(id(config))
        ordered.append(config)
        with contextlib.suppress(Exception):
            queue.extend(value for value in vars(config).values() if _is_config(value))
    return ordered


def _config_value(configs: list, names: Sequence[str]):
    for config in configs:
        for name in names:
            with contextlib.suppress(Exception):  # some configs raise on ambiguous per-layer attributes
                value = getattr(config, name, None)
                if value is not None and not isinstance(value, bool):
                    return value
    return None


def _pair(size) -> Optional[tuple[int, int]]:
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, (tuple, list)) and len(size) >= 2 and all(isinstance(s, int) and s > 0 for s in size[-2:]):
        return int(size[-2]), int(size[-1])
    if isinstance(size, Mapping):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    return None


def _carried_sizes(model: nn.Module):
    """(height, width) and channels the modules carry themselves: torchvision's `image_size`,
    timm's `patch_embed.img_size` and `pretrained_cfg["input_size"]`."""
    size = channels = None
    for module in model.modules():
        if size is None:
            for name in ("image_size", "img_size"):
                size = size or _pair(getattr(module, name, None))
        cfg = getattr(module, "pretrained_cfg", None)
        if isinstance(cfg, Mapping) and isinstance(cfg.get("input_size"), (tuple, list)):
            channels = channels or cfg["input_size"][0]
            size = size or _pair(cfg["input_size"])
        if size is not None and channels is not None:
            break
    return size, channels


def _first_conv_channels(model: nn.Module) -> Optional[int]:
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return None if conv is None else conv.in_channels


def _parameter_dtype_device(model: nn.Module):
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.float32, torch.device("cpu")


def _signature(module: nn.Module):
    with contextlib.suppress(TypeError, ValueError):
        return inspect.signature(module.forward).parameters
    return {}


def _pixel_arguments(module: nn.Module, is_root: bool = True) -> list[str]:
    """The forward arguments that take pixels: known names and `main_input_name`; for the model
    itself (not a tower inside it), else its first argument (`forward(x)`, `forward(hidden_states,
    grid_thw)` of pre-patchified towers)."""
    parameters = _signature(module)
    names = [name for name in parameters if name in _PIXEL_ARGUMENTS or ("pixel" in name and name not in _NOT_PIXELS)]
    main = getattr(module, "main_input_name", None)
    for name in [main] if isinstance(main, str) else list(main or []):
        if name in parameters and name not in names and not name.endswith("input_ids"):
            names.append(name)
    if not names and is_root:
        first = next(iter(parameters.values()), None)
        if first is not None and first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD, first.VAR_POSITIONAL):
            names = [first.name]
    # One pixel argument per input kind: the main one(s), and a high-resolution copy if the model has one.
    if len(names) > 1 and "pixel_values" in names:
        names = [n for n in names if n == "pixel_values" or n.startswith("high_res")]
    return names


class _Sizes:
    """Everything the dummy inputs are sized from, for one module (its own configs first)."""

    def __init__(self, module: nn.Module, root: nn.Module, image_size: Optional[int]):
        configs = _configs(module, root) if module is not root else _configs(root)
        carried_size, carried_channels = _carried_sizes(module)
        self.size = _pair(image_size) or _pair(_config_value(configs, _SIZE_NAMES)) or carried_size or (224, 224)
        self.channels = int(
            _config_value(configs, _CHANNEL_NAMES) or carried_channels or _first_conv_channels(module) or 3
        )
        frames = _config_value(configs, _FRAME_NAMES)
        self.frames = frames if isinstance(frames, int) and frames > 0 else None
        patch = _config_value(configs, ("patch_size",))
        self.patch = patch if isinstance(patch, int) else (_pair(patch) or (16, 16))[0]
        temporal = _config_value(configs, ("temporal_patch_size",))
        self.temporal_patch = temporal if isinstance(temporal, int) else 1
        merge = _config_value(configs, ("spatial_merge_size",))
        self.merge = merge if isinstance(merge, int) else 1
        vocab = _config_value(configs, ("vocab_size",))
        self.vocab = vocab if isinstance(vocab, int) and vocab > 1 else 2
        task_length = _config_value(configs, ("task_seq_len",))
        self.task_length = task_length if isinstance(task_length, int) else _TEXT_LENGTH
        tiles = _config_value(configs, ("max_num_tiles",))
        self.tiles = tiles if isinstance(tiles, int) else 1
        self.dtype, self.device = _parameter_dtype_device(root)


def _token_ids(sizes: _Sizes, rows: int = 1, length: int = _TEXT_LENGTH) -> torch.Tensor:
    ids = torch.arange(1, length + 1).remainder(sizes.vocab - 1) + 1  # never 0 (often padding)
    return ids.clamp(max=sizes.vocab - 1).repeat(rows, 1).to(sizes.device)


def _pixels_for(name: str, parameters, sizes: _Sizes, layout: str) -> torch.Tensor:
    """A batch-1 dummy for the pixel argument `name`, in the layout its model family takes."""
    generator = torch.Generator().manual_seed(0)
    c, (h, w) = sizes.channels, sizes.size

    def randn(*shape):
        return torch.randn(shape, generator=generator).to(device=sizes.device, dtype=sizes.dtype)

    if name == "flattened_patches":  # Pix2Struct: row id, column id, then the flattened patch
        patches = randn(1, _GRID_SIDE**2, 2 + c * sizes.patch**2)
        ids = torch.arange(_GRID_SIDE**2)
        patches[..., 0], patches[..., 1] = ids // _GRID_SIDE + 1, ids % _GRID_SIDE + 1
        return patches
    if any(grid in parameters for grid in _GRID_ARGUMENTS):  # pre-patchified rows of all images
        side = _GRID_SIDE * sizes.merge
        return randn(side * side, c * sizes.temporal_patch * sizes.patch**2)
    if "spatial_shapes" in parameters:  # SigLIP2-style: (B, patches, C*p*p)
        return randn(1, _GRID_SIDE**2, c * sizes.patch**2)
    if "aspect_ratio_ids" in parameters:  # Mllama: (B, images, tiles, C, H, W)
        return randn(1, 1, sizes.tiles, c, h, w)
    frames = sizes.frames or 2
    shapes = {"TCHW": (1, frames, c, h, w), "CTHW": (1, c, frames, h, w), "PCHW": (1, 2, c, h, w)}
    return randn(*shapes.get(layout, (1, c, h, w)))


def _other_argument(name: str, pixels: torch.Tensor, sizes: _Sizes, ids_rows: int = 1):
    """A small valid dummy for a non-pixel argument, or `None` when there is no rule for it."""
    device = sizes.device
    if name in _GRID_ARGUMENTS:
        side = _GRID_SIDE * sizes.merge
        return torch.tensor([[1, side, side]], device=device)
    if name == "spatial_shapes":
        return torch.tensor([[_GRID_SIDE, _GRID_SIDE]], device=device)
    if name == "pixel_attention_mask":
        return torch.ones(pixels.shape[:2], dtype=torch.long, device=device)
    if name == "pixel_mask":
        return torch.ones((pixels.shape[0], *pixels.shape[-2:]), dtype=torch.long, device=device)
    if name == "task_inputs":  # OneFormer: the tokenised task prompt ("the task is semantic")
        return _token_ids(sizes, length=sizes.task_length)
    if name.endswith("input_ids"):
        return _token_ids(sizes, ids_rows)
    if name.endswith("attention_mask") or name.endswith("token_type_ids"):
        fill = torch.ones if name.endswith("attention_mask") else torch.zeros
        return fill((ids_rows, _TEXT_LENGTH), dtype=torch.long, device=device)
    if name == "aspect_ratio_ids":
        return torch.ones((1, 1), dtype=torch.long, device=device)
    if name == "aspect_ratio_mask":
        return torch.ones((1, 1, sizes.tiles), dtype=torch.long, device=device)
    if name == "classes_structure":  # OmDet-Turbo: number of class prompts per image
        return torch.tensor([ids_rows], device=device)
    return None


def _inputs_for(module: nn.Module, root: nn.Module, image_size: Optional[int], module_path: str = ""):
    """Candidate inputs for `module` (built lazily), most complete first: pixels plus every
    text/task argument its forward has, then pixels plus the required ones only; per layout
    (videos: frames first, then channels first; images: single, then pairs)."""
    parameters = _signature(module)
    pixel_names = _pixel_arguments(module, is_root=module is root)
    if not pixel_names:
        return
    sizes = _Sizes(module, root, image_size)
    required = [
        name for name, p in parameters.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and name not in pixel_names
    ]  # fmt: skip
    texts = [name for name in parameters if name.endswith("input_ids") or name == "task_inputs"]
    masks = [name.replace("input_ids", "attention_mask") for name in texts if name.endswith("input_ids")]
    optional = [name for name in (*texts, *masks) if name in parameters and name not in required]
    if any("video" in name for name in pixel_names):
        layouts = ["TCHW", "CTHW"]
    elif sizes.frames:  # frames in a config: a video model, or an image model with a video sub-config
        layouts = ["TCHW", "CTHW", "CHW"]
    else:  # an image; image pairs (keypoint matching) last
        layouts = ["CHW", "PCHW"]
    for layout in layouts:
        for extra in ([*required, *optional], required) if optional else (required,):
            pixels = {name: _pixels_for(name, parameters, sizes, layout) for name in pixel_names}
            first = next(iter(pixels.values()))
            others = {name: _other_argument(name, first, sizes) for name in extra}
            if any(value is None for name, value in others.items() if name in required):
                continue
            kwargs = {**pixels, **{name: value for name, value in others.items() if value is not None}}
            args = ()
            head = next(iter(parameters.values()), None)
            if head is not None and head.kind in (head.POSITIONAL_ONLY, head.VAR_POSITIONAL):
                args = (kwargs.pop(head.name),) if head.name in kwargs else (kwargs.pop(pixel_names[0]),)
            yield ProbeInput(args, kwargs, tuple(pixels.values()), module_path)


def candidate_inputs(model: nn.Module, *, image_size: Optional[int] = None, towers: bool = True):
    """Dummy inputs (batch 1) the first-layer probe tries, in order.

    Built from the forward signature (which arguments take pixels; required text / task arguments
    get small valid dummies: token ids inside the vocabulary, attention masks, task inputs, grids of
    pre-patchified towers) and from every config the model holds, nested ones included (image size,
    channels and frame count, under the names families use: `image_size` / `crop_size`,
    `num_channels`, `num_frames` / `frames_per_clip`, ...), else from sizes the modules carry
    (torchvision `image_size`, timm `img_size` / `pretrained_cfg`), else 3×224×224.

    Args:
        model (`nn.Module`): The model.
        image_size (`int`, *optional*): Image side to use instead of the one the model says.
        towers (`bool`, *optional*, defaults to `True`): After the whole model's inputs, yield inputs
            for each vision tower run on its own (submodules whose forward takes pixels).

    Yields:
        [`ProbeInput`]: candidates, the whole model's first.
    """
    yield from _inputs_for(model, model, image_size)
    if not towers:
        return
    count = 0
    for path, module in model.named_modules():
        if not path or count >= _MAX_TOWERS or isinstance(module, WEIGHT_LAYER_TYPES):
            continue
        if not any(n in _signature(module) for n in _PIXEL_ARGUMENTS if n not in ("x", "input", "inputs")):
            continue
        if _pixel_arguments(module, is_root=False):
            count += 1
            yield from _inputs_for(module, model, image_size, path)


def user_inputs(example_inputs: ExampleInputs, model: nn.Module) -> ProbeInput:
    """The user's example input as a [`ProbeInput`]: every floating-point tensor is pixels."""
    dtype, device = _parameter_dtype_device(model)

    def prepare(value):
        if isinstance(value, torch.Tensor):
            return value.detach().to(device)
        return value

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = [example_inputs]
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), {k: prepare(v) for k, v in example_inputs.items()}
        if len(kwargs) == 1 and "x" in kwargs:  # positional input for non-transformers models
            args, kwargs = (kwargs["x"],), {}
    else:
        args, kwargs = tuple(prepare(v) for v in example_inputs), {}
    pixels = tuple(v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor) and v.is_floating_point())
    return ProbeInput(args, kwargs, pixels)


__all__ = ["ExampleInputs", "ProbeInput", "WEIGHT_LAYER_TYPES", "candidate_inputs", "user_inputs"]
