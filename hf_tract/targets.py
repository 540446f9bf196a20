"""Which layer is "first": the layer(s) that consume the raw pixels.

Three sources, tried in order:

1. a registry of the paths measured for every transformers vision family (``first_layers.json``,
   keyed by model class, then by ``model_type``);
2. timm's own metadata (``pretrained_cfg["first_conv"]``) for raw timm models, ``TimmWrapper*``
   models and timm backbones inside transformers models;
3. a probe that works for any model: one ``no_grad`` forward on dummy inputs built from the forward
   signature and every nested config (:func:`candidate_inputs`); a Conv/Linear is a first layer if
   its input derives from the pixels through torch functions that do not pass through another
   Conv/Linear/Embedding (tracked by a ``TorchFunctionMode``, no autograd graph, no tensor kept).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import json
import logging
import warnings
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from .modules import SUPPORTED_LAYER_TYPES
from .wrappers import unwrap_for_patching

logger = logging.getLogger(__name__)

_WEIGHT_LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)

ExampleInputs = Union[torch.Tensor, Mapping[str, Any], Sequence[Any]]


class FirstLayerNotFoundError(RuntimeError):
    """No first layer could be determined; the message lists candidates and how to pass ``target=``."""


@functools.lru_cache(maxsize=1)
def _registry() -> dict:
    return json.loads(resources.files(__package__).joinpath("first_layers.json").read_text())


def _supported(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_LAYER_TYPES)


def _path_matches(name: str, recorded: str) -> bool:
    # The registry path is relative to the class the survey ran; the same layer sits under a
    # different prefix in other heads (ViTModel vs ViTForImageClassification) or wrappers.
    return name == recorded or recorded.endswith("." + name) or name.endswith("." + recorded)


def _from_registry(model: nn.Module) -> list[str]:
    """Recorded first layers of this model class, else of this ``model_type`` (matched by path
    suffix); used only when exactly one recorded set of layers is present in the model."""
    registry = _registry()
    modules = {name: m for name, m in model.named_modules() if _supported(m)}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    lookups = (
        (registry["by_class"].get(type(model).__name__, []), str.__eq__),
        (registry["by_model_type"].get(model_type, []), _path_matches),
    )
    for path_sets, matches in lookups:
        present = set()
        for paths in path_sets:
            found = tuple(sorted(n for n in modules if any(matches(n, p) for p in paths)))
            if found and all(any(matches(n, p) for n in found) for p in paths):
                present.add(found)
        if len(present) == 1:
            return list(present.pop())
    return []


def _from_timm(model: nn.Module) -> list[str]:
    found = []
    for prefix, module in model.named_modules():
        cfg = getattr(module, "pretrained_cfg", None)
        first_conv = cfg.get("first_conv") if isinstance(cfg, Mapping) else None
        if not first_conv:
            continue
        for conv in [first_conv] if isinstance(first_conv, str) else first_conv:
            name = f"{prefix}.{conv}" if prefix else conv
            with contextlib.suppress(AttributeError):
                if _supported(model.get_submodule(name)):
                    found.append(name)
        if found:
            return found
    return found


# ---------------------------------------------------------------------------------------------
# example inputs: built from the forward signature, every nested config and sizes the model carries

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
    """One way to call a model: ``model.get_submodule(module_path)(*args, **kwargs)``.

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
    """The configs of ``modules`` and of their submodules, each followed (breadth first) by its nested
    sub-configs (``vision_config``, ``backbone_config``, encoder sub-configs, ...), without repeats."""
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
    """(height, width) and channels the modules carry themselves: torchvision's ``image_size``,
    timm's ``patch_embed.img_size`` and ``pretrained_cfg["input_size"]``."""
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
    """The forward arguments that take pixels: known names and ``main_input_name``; for the model
    itself (not a tower inside it), else its first argument (``forward(x)``, ``forward(hidden_states,
    grid_thw)`` of pre-patchified towers)."""
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
    """A batch-1 dummy for the pixel argument ``name``, in the layout its model family takes."""
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
    """A small valid dummy for a non-pixel argument, or ``None`` when there is no rule for it."""
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
    """Candidate inputs for ``module`` (built lazily), most complete first: pixels plus every
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
    channels and frame count, under the names families use: ``image_size`` / ``crop_size``,
    ``num_channels``, ``num_frames`` / ``frames_per_clip``, ...), else from sizes the modules carry
    (torchvision ``image_size``, timm ``img_size`` / ``pretrained_cfg``), else 3×224×224.

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
        if not path or count >= _MAX_TOWERS or isinstance(module, _WEIGHT_LAYER_TYPES):
            continue
        if not any(n in _signature(module) for n in _PIXEL_ARGUMENTS if n not in ("x", "input", "inputs")):
            continue
        if _pixel_arguments(module, is_root=False):
            count += 1
            yield from _inputs_for(module, model, image_size, path)


def _user_inputs(example_inputs: ExampleInputs, model: nn.Module) -> ProbeInput:
    """The user's example input as a :class:`ProbeInput`: every floating-point tensor is pixels."""
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


# ---------------------------------------------------------------------------------------------
# the probe: which weight layers see pixel-derived tensors, under no_grad


_VALUE_FREE = ("size", "dim", "numel", "shape", "dtype", "device", "is_floating_point", "is_contiguous", "stride")
# Functions whose other tensor arguments give only a dtype, device or shape: ``x.to(pixels)`` is not pixels.
_FIRST_ARGUMENT_ONLY = ("to", "type_as", "view_as", "reshape_as", "expand_as")


class _PixelTracker(TorchFunctionMode):
    """Marks the tensors derived from the pixels, without an autograd graph and without keeping any
    tensor alive (weak references): the output of a torch function is marked when one of its inputs
    is (in-place ops and ``__setitem__`` mark the tensor they write, and its base when it is a view),
    except outputs of weight layers (Conv/Linear/Embedding: unmarked by a forward hook), of
    functions that read only shapes (``*_like``, ``new_*``) and of integer / bool results (indices,
    masks: no gradient would flow through them either); ``x.to(pixels)`` follows ``x`` only."""

    def __init__(self):
        super().__init__()
        self.marked = WeakIdKeyDictionary()

    def is_marked(self, values) -> bool:
        return any(isinstance(v, torch.Tensor) and v in self.marked for v in tree_leaves(values))

    def mark(self, tensor: torch.Tensor) -> None:
        self.marked[tensor] = True
        base = tensor._base
        if base is not None:
            self.marked[base] = True

    def unmark(self, values) -> None:
        for value in tree_leaves(values):
            if isinstance(value, torch.Tensor):
                self.marked.pop(value, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _VALUE_FREE or name.endswith("_like") or name.startswith("new_"):
            return output
        if self.is_marked(args[:1] if name in _FIRST_ARGUMENT_ONLY else (args, kwargs)):
            for value in tree_leaves(output):
                if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
                    self.mark(value)
            written = args[0] if args and (name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))) else None
            for value in (written, kwargs.get("out")):
                if isinstance(value, torch.Tensor):
                    self.mark(value)
        return output


class _ConsumerHooks:
    """Forward hooks on every weight layer: record those whose input is marked, unmark their outputs."""

    def __init__(self, model: nn.Module, tracker: _PixelTracker):
        self.tracker = tracker
        self.consumers: list[str] = []
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, _WEIGHT_LAYER_TYPES):
                self.handles.append(
                    module.register_forward_pre_hook(functools.partial(self._before, name), with_kwargs=True)
                )
                self.handles.append(module.register_forward_hook(self._after, always_call=True))

    def _before(self, name, module, args, kwargs):
        if name not in self.consumers and self.tracker.is_marked((args, kwargs)):
            self.consumers.append(name)

    def _after(self, module, args, output):
        self.tracker.unmark(output)

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _probe_once(model: nn.Module, candidate: ProbeInput) -> tuple[list[str], Optional[BaseException]]:
    tracker = _PixelTracker()
    hooks = _ConsumerHooks(model, tracker)
    error = None
    try:
        with torch.no_grad(), tracker:
            for pixels in candidate.pixels:
                tracker.mark(pixels)
            candidate.run(model)
    except Exception as exc:  # noqa: BLE001 - an error after the first layer ran never hides it
        error = exc
    finally:
        hooks.remove()
    return hooks.consumers, error


def probe_first_layers(
    model: nn.Module, example_inputs: Optional[ExampleInputs] = None, *, image_size: Optional[int] = None
) -> list[str]:
    """Names of the weight layers that directly consume the pixels, in call order.

    Runs the model in eval mode under ``torch.no_grad`` (no autograd graph: the cost of one inference
    forward) on ``example_inputs``, or else on the candidates of :func:`candidate_inputs` in turn,
    the whole model first and its vision towers alone last. A layer consumes the pixels when its
    input is derived from them by torch functions that do not pass through another Conv / Linear /
    Embedding. A forward that fails after a first layer ran still counts; one that fails earlier,
    or finds nothing, moves on to the next candidate.

    Args:
        model (`nn.Module`): The model.
        example_inputs (`torch.Tensor`, `dict` or `list`, *optional*): The input to use (its
            floating-point tensors are the pixels) instead of dummies.
        image_size (`int`, *optional*): Side of the dummy images (default: what the model says).

    Returns:
        `list[str]`: Dotted names, in the order the layers first ran.

    Raises:
        FirstLayerNotFoundError: If no candidate reached a layer; the message has the last error.
    """
    candidates = [_user_inputs(example_inputs, model)] if example_inputs is not None else None
    was_training = model.training
    partial, last_error, tried = None, None, False
    towers: dict[str, list[str]] = {}  # vision towers run alone -> the layers they found
    model.eval()
    try:
        for candidate in candidates or candidate_inputs(model, image_size=image_size):
            path = candidate.module_path
            if path and partial is not None:
                break  # a layer was found on the whole model: towers alone add nothing
            if path and any(path == p or path.startswith(p + ".") for p in towers):
                continue  # this tower (or the one holding it) already answered
            tried = True
            consumers, error = _probe_once(model, candidate)
            if error is not None:
                logger.debug("first-layer probe forward failed: %r", error)
                last_error = error
            if path and consumers:
                towers[path] = consumers
            elif consumers and error is None:
                return consumers
            elif consumers and partial is None:
                partial = consumers
    finally:
        model.train(was_training)
    found = partial or [name for consumers in towers.values() for name in consumers]
    if found:
        return list(dict.fromkeys(found))
    if last_error is not None:
        raise FirstLayerNotFoundError(f"the probe forward failed before any layer consumed the pixels: {last_error!r}")
    reason = "no forward argument takes pixels" if not tried else "no Conv/Linear consumed the pixels"
    raise FirstLayerNotFoundError(f"the probe found no first layer ({reason})")


def _candidates_message(model: nn.Module) -> str:
    candidates = [f"  {name} ({type(m).__name__})" for name, m in model.named_modules() if _supported(m)][:8]
    return "\n".join(candidates) or "  (none: the model has no nn.Linear / nn.Conv1d / nn.Conv2d / nn.Conv3d)"


def find_first_layers(
    model: nn.Module,
    example_inputs: Optional[ExampleInputs] = None,
    *,
    use_registry: bool = True,
    image_size: Optional[int] = None,
) -> list[tuple[str, nn.Module]]:
    """All layers that consume the raw pixels of ``model`` (several for two-tower or parallel stems).

    Args:
        model (`nn.Module`): A transformers, timm or torchvision model (or any ``nn.Module``), not yet wrapped.
        example_inputs (`torch.Tensor`, `dict` or `list`, *optional*): Input for the probe forward (a
            tensor, a list of positional arguments or a dict of keyword arguments). Passing it forces
            the probe, skipping the registries.
        use_registry (`bool`, *optional*, defaults to `True`): Look the model up in the first-layer
            registry and timm's metadata before probing. `False` runs the probe alone.
        image_size (`int`, *optional*): Side of the probe's dummy images (default: what the model says).

    Returns:
        `list[tuple[str, nn.Module]]`: ``[(dotted_name, module), ...]`` in call order.

    Raises:
        FirstLayerNotFoundError: Listing candidate layers and how to pass ``target=``.
    """
    model = unwrap_for_patching(model)
    if _supported(model):  # a bare layer: it consumes whatever it is given
        return [("", model)]
    sources = [_from_registry, _from_timm] if example_inputs is None and use_registry else []
    names: list[str] = []
    for source in sources:
        names = source(model)
        if names:
            break
    probe_error = None
    if not names:
        try:
            names = probe_first_layers(model, example_inputs, image_size=image_size)
        except FirstLayerNotFoundError as exc:
            probe_error = exc
    modules = dict(model.named_modules())
    found = [(name, modules[name]) for name in names]
    if not found:
        reason = f" ({probe_error})" if probe_error else ""
        raise FirstLayerNotFoundError(
            f"Could not find the first layer of {type(model).__name__}{reason}. Candidate layers:\n"
            f"{_candidates_message(model)}\nPass it explicitly, e.g. apply_tract(model, target='<dotted name>'), "
            "or pass example_inputs=... so the probe can run a forward pass."
        )
    return found


def find_first_layer(model: nn.Module, example_inputs: Optional[ExampleInputs] = None) -> tuple[str, nn.Module]:
    """The layer that consumes the raw pixels, as ``(dotted_name, module)``.

    Raises:
        FirstLayerNotFoundError: if none is found, or if the model has several first layers
            (use :func:`find_first_layers` then).
    """
    found = find_first_layers(model, example_inputs)
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise FirstLayerNotFoundError(
            f"{type(model).__name__} has {len(found)} first layers ({names}); use find_first_layers(model)."
        )
    return found[0]


# A model this small runs the probe forward in well under a second on a CPU: resolve_targets checks
# a user's target= against it. Larger models are checked against the registries only.
_CHEAP_PROBE_PARAMETERS = 20_000_000


def _discovered_cheaply(model: nn.Module, example_inputs: Optional[ExampleInputs]) -> list[str]:
    """The first layers where finding them is cheap (registry, timm metadata, or the probe on a small
    model or the user's own example input); ``[]`` when unknown. Never raises."""
    with contextlib.suppress(Exception):
        if example_inputs is None:
            names = _from_registry(model) or _from_timm(model)
            if names:
                return names
            if sum(p.numel() for p in model.parameters()) > _CHEAP_PROBE_PARAMETERS:
                return []
            if any(p.is_meta for p in model.parameters()):
                return []
        return probe_first_layers(model, example_inputs)
    return []


def _not_a_submodule(model: nn.Module, name: str, example_inputs) -> str:
    layers = [n for n, m in model.named_modules() if _supported(m)]
    close = difflib.get_close_matches(name, layers, n=3, cutoff=0.5) or difflib.get_close_matches(
        name, [n for n, _ in model.named_modules() if n], n=3, cutoff=0.5
    )
    message = f"target {name!r} is not a submodule of {type(model).__name__}."
    if close:
        message += " Closest names: " + ", ".join(repr(c) for c in close) + "."
    first = _discovered_cheaply(model, example_inputs)
    if first:
        message += f" The layer that consumes the pixels is {', '.join(repr(n) for n in first)}."
    if not close and not first:
        message += " Leave target=None to discover the first layer, or see model.named_modules()."
    return message


def resolve_targets(
    model: nn.Module, target: Optional[Union[str, Sequence[str]]], example_inputs: Optional[ExampleInputs] = None
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs ``apply_tract`` patches: ``target`` resolved in ``model``, or discovered.

    Args:
        model (`nn.Module`): The (unwrapped) model.
        target (`str` or `list[str]`, *optional*): Dotted name(s) of the layer(s); `None` discovers them
            with :func:`find_first_layers`.
        example_inputs (`torch.Tensor`, `dict` or `list`, *optional*): Input for the discovery probe.

    Returns:
        `list[tuple[str, nn.Module]]`: The layers, in the order given (or discovered).

    Raises:
        ValueError: If ``target`` is empty (``""``, ``[]``) or names a module ``model`` does not have
            (the message suggests the closest names and the discovered first layer).
        FirstLayerNotFoundError: If ``target`` is `None` and no first layer can be found.

    A target that exists but does not consume the pixels is accepted with a warning naming the layer
    that does (checked where discovery is cheap: registry, timm metadata, or a probe of a small model).
    """
    if target is None:
        return find_first_layers(model, example_inputs)
    names = [target] if isinstance(target, str) else list(target)
    if not names or any(not isinstance(name, str) or not name.strip() for name in names):
        raise ValueError(
            f"target must be a dotted module name or a non-empty list of them, got {target!r}; "
            "leave it unset (None) to discover the first layer."
        )
    resolved = []
    for name in names:
        try:
            resolved.append((name, model.get_submodule(name)))
        except AttributeError:
            raise ValueError(_not_a_submodule(model, name, example_inputs)) from None
    first = _discovered_cheaply(model, example_inputs)
    stray = [name for name, module in resolved if first and name not in first and _supported(module)]
    if stray:
        warnings.warn(
            f"target {', '.join(repr(n) for n in stray)} does not consume the pixels of {type(model).__name__}; "
            f"the first layer is {', '.join(repr(n) for n in first)}. TrAct preconditions with the input patches of "
            "the layer it patches: pass the first layer (or leave target=None) unless this is what you want.",
            UserWarning,
            stacklevel=3,
        )
    return resolved
