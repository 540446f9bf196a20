"""Tiny models for the table tests, built offline from the first-layer survey records.

``tests/data/hf_first_layers_records.json`` is a copy of ``shared/hf_first_layers.json``: one record
per transformers vision family (or variant), with the tiny config the survey ran, the class it ran
(``module_class``; for VLMs ``"Top -> path (TowerClass) run standalone"``), the input shapes and the
layer(s) that consumed the pixels (``direct_pixel_consumers``, relative to the class run).

:func:`build_case` turns a record into the module to run, its inputs (batch 2) and the recorded
first-layer paths; :func:`first_layer_oracle` gives the closed-form TrAct gradient of a first
layer from a plain copy of the model, through the weight its conv/linear op actually sees.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from tests.oracle import patch_matrix_reference, tract_grad_reference


RECORDS_PATH = Path(__file__).parent / "data" / "hf_first_layers_records.json"
BATCH = 2

_TOWER_CLASS = re.compile(r"^(?P<top>\w+) -> (?P<path>[\w.]+) \((?P<tower>\w+)\) run standalone$")


class CaseSkip(Exception):
    """The record's tiny model cannot be built or run here; the message says why."""


# Records the survey ran at a default size, shrunk for the tests (smaller images, narrower and
# shallower stacks): the first layer's path, kind, kernel, stride and padding are unchanged, and a
# test on one of them stays well under a GB (ALIGN at 600x600 with 89M float64 parameters took the
# suite to 20 GB). key -> (config kwargs merged into the record's, pixel input shapes).
SHRUNK: dict[str, tuple[dict, dict]] = {
    "align": (
        {"text_config": {"hidden_size": 32, "num_attention_heads": 2, "vocab_size": 99, "intermediate_size": 64},
         "vision_config": {"image_size": 64, "depth_coefficient": 0.5, "hidden_dim": 64}, "projection_dim": 16},
        {"pixel_values": [1, 3, 64, 64]},
    ),
    "yolos": ({"image_size": [64, 96]}, {"pixel_values": [1, 3, 64, 96]}),
    "videoprism_vision_model": ({"image_size": 32, "num_frames": 2}, {"pixel_values_videos": [1, 2, 3, 32, 32]}),
    "clipseg": ({"vision_config": {"image_size": 64}}, {"pixel_values": [1, 3, 64, 64]}),
    "chinese_clip": ({"vision_config": {"image_size": 64}}, {"pixel_values": [1, 3, 64, 64]}),
    "upernet": (
        {"backbone_config": {"model_type": "resnet", "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1],
                             "embedding_size": 16, "out_features": ["stage1", "stage2", "stage3", "stage4"]},
         "hidden_size": 32, "auxiliary_channels": 16},
        {"pixel_values": [1, 3, 64, 64]},
    ),
    "swin2sr": ({"embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2], "window_size": 8, "image_size": 32},
                {"pixel_values": [1, 3, 32, 32]}),
    # (LightGlue shrunk this way finds no keypoint a gradient flows through: it stays at its default size.)
    "superglue": (
        {"keypoint_detector_config": {"encoder_hidden_sizes": [8, 8, 16, 16], "decoder_hidden_size": 32,
                                      "descriptor_decoder_dim": 32, "max_keypoints": 32},
         "hidden_size": 32, "keypoint_encoder_sizes": [8, 16], "gnn_layers_types": ["self", "cross"],
         "num_attention_heads": 2},
        {"pixel_values": [1, 2, 3, 64, 64]},
    ),
    **{key: ({"backbone": "resnet18"}, {"pixel_values": [1, 3, 64, 64]})
       for key in ("conditional_detr", "deformable_detr", "dab-detr", "table-transformer")},
}  # fmt: skip


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for name, value in update.items():
        merged[name] = _merge(merged.get(name) or {}, value) if isinstance(value, dict) else value
    return merged


@functools.lru_cache(maxsize=1)
def load_records() -> dict[str, dict]:
    records = {record["key"]: record for record in json.loads(RECORDS_PATH.read_text())}
    for key, (config_kwargs, pixel_inputs) in SHRUNK.items():
        record = records[key]
        record["config_kwargs"] = _merge(record.get("config_kwargs") or {}, config_kwargs)
        record["pixel_inputs"] = pixel_inputs
        record["shrunk_for_tests"] = True
    return records


def has_first_layer(record: dict) -> bool:
    return bool(record.get("direct_pixel_consumers"))


def is_empirical(record: dict) -> bool:
    return (record.get("first_layer_source") or "").startswith("empirical")


def tower_parts(record: dict) -> Optional[re.Match]:
    return _TOWER_CLASS.match(record["module_class"])


@dataclass
class Case:
    """One record made runnable: ``run(model, inputs)`` is the forward the survey observed."""

    record: dict
    model: nn.Module
    inputs: dict[str, Any]
    expected: list[str]
    run: Callable[[nn.Module, dict], Any] = field(default=lambda model, inputs: model(**inputs))
    dtype: torch.dtype = torch.float64
    truncated: bool = False  # outputs are the first layers' outputs (the full forward fails here)


# ---------------------------------------------------------------------------------------------
# building


def _transformers_attr(name: str, model_type: str):
    import transformers

    with contextlib.suppress(AttributeError, ImportError, ModuleNotFoundError):
        return getattr(transformers, name)
    module_name = model_type.replace("-", "_")
    for suffix in ("modeling", "configuration"):
        with contextlib.suppress(ImportError, ModuleNotFoundError, AttributeError):
            return getattr(importlib.import_module(f"transformers.models.{module_name}.{suffix}_{module_name}"), name)
    raise CaseSkip(f"{name} is not importable from transformers (model_type {model_type!r})")


def _no_pretrained_backbone(config) -> None:
    """Never let a config reach for the Hub (timm / HF backbones default to pretrained weights)."""
    for name in ("use_pretrained_backbone",):
        if getattr(config, name, False):
            setattr(config, name, False)
    for sub in ("backbone_config", "vision_config", "encoder_config"):
        child = getattr(config, sub, None)
        if child is not None and hasattr(child, "to_dict") and child is not config:
            _no_pretrained_backbone(child)
    if getattr(config, "model_type", None) == "timm_backbone" or hasattr(config, "use_pretrained_backbone"):
        with contextlib.suppress(Exception):
            config.use_pretrained_backbone = False


def _sub_config_of(config, class_name: str):
    for name, value in vars(config).items():
        if type(value).__name__ == class_name:
            return value
    return None


def build_config(record: dict, cls: type):
    """The record's tiny config: the config class of the class run, or for VLM-tower records the
    top-level model's default sub-config of the recorded class, updated with the recorded kwargs."""
    from transformers import AutoConfig

    kwargs = dict(record.get("config_kwargs") or {})
    tower_config = kwargs.pop("<tower config>", None)
    if tower_config is not None:
        config = None
        with contextlib.suppress(Exception):
            config = _sub_config_of(AutoConfig.for_model(record["model_type"]), tower_config)
        if config is None:
            config = _transformers_attr(tower_config, record["model_type"])(**kwargs)
        else:
            for name, value in kwargs.items():
                setattr(config, name, value)
    else:
        config_class = getattr(cls, "config_class", None)
        if config_class is not None and getattr(config_class, "model_type", None):
            config = config_class(**kwargs)
        else:
            config = AutoConfig.for_model(record["model_type"], **kwargs)
    _no_pretrained_backbone(config)
    if "default" in (record.get("config_source") or "").lower():
        _fewer_layers(config)
    return config


def _fewer_layers(config) -> None:
    """One layer per stack for records the survey ran with a default-size config: the first layer
    and everything before it are unchanged, the test gets ~10x cheaper."""
    for name in ("num_hidden_layers", "encoder_layers", "decoder_layers"):
        if isinstance(getattr(config, name, None), int) and getattr(config, name) > 1:
            with contextlib.suppress(Exception):
                setattr(config, name, 1)


def _instantiate(cls, config):
    if hasattr(cls, "_from_config"):
        with contextlib.suppress(TypeError, ValueError, AttributeError):
            return cls._from_config(config, attn_implementation="eager")
        return cls._from_config(config)
    return cls(config)


def build_model(record: dict) -> nn.Module:
    """The module the survey ran for ``record``, with random weights, in eval mode."""
    tower = tower_parts(record)
    class_name = tower["tower"] if tower else record["module_class"]
    cls = _transformers_attr(class_name, record["model_type"])
    config = build_config(record, cls)
    torch.manual_seed(0)
    model = _instantiate(cls, config)
    if record.get("submodule_run"):
        model = model.get_submodule(record["submodule_run"])
    return model.eval()


def _int_tensor(shape, high):
    return torch.randint(0, high, tuple(shape))


def _grid(num_patches: int, images: int) -> torch.Tensor:
    side = math.isqrt(num_patches // images)
    return torch.tensor([[1, side, side]] * images)


def build_inputs(record: dict, dtype: torch.dtype, batch: int = BATCH) -> dict[str, Any]:
    """Inputs of the recorded shapes with batch ``batch``: float tensors are the pixels."""
    generator = torch.Generator().manual_seed(1)
    pixel_shapes = dict(record.get("pixel_inputs") or {})
    other_shapes = dict(record.get("other_inputs") or {})
    grid_key = next((k for k in other_shapes if k.endswith("grid_thw")), None)
    inputs: dict[str, Any] = {}
    for name, shape in pixel_shapes.items():
        shape = list(shape)
        if grid_key is not None and len(shape) == 2:  # pre-patchified rows of all images: (P, C*T*p*p)
            shape[0] *= batch
        else:
            shape[0] = batch if shape[0] == 1 else shape[0]
        if name == "input_ids":
            inputs[name] = torch.randint(0, 16, shape, generator=generator)
            continue
        tensor = torch.randn(shape, generator=generator, dtype=dtype)
        if name == "flattened_patches":  # columns 0/1 are row/column ids of the patch
            side = math.isqrt(shape[1])
            ids = torch.arange(shape[1])
            tensor[..., 0], tensor[..., 1] = (ids // side + 1).to(dtype), (ids % side + 1).to(dtype)
        inputs[name] = tensor
    pixels = next(iter(inputs.values()), None)
    for name, shape in other_shapes.items():
        shape = list(shape)
        shape[0] = batch if shape[0] == 1 else shape[0]
        if name.endswith("grid_thw"):
            inputs[name] = _grid(pixels.shape[0], batch)
        elif name == "spatial_shapes":
            side = math.isqrt(other_shapes.get("pixel_attention_mask", [1, pixels.shape[1]])[1])
            inputs[name] = torch.tensor([[side, side]] * batch)
        elif name in ("pixel_attention_mask", "attention_mask", "aspect_ratio_mask"):
            inputs[name] = torch.ones(shape, dtype=torch.long)
        elif name == "aspect_ratio_ids":
            inputs[name] = torch.ones(shape, dtype=torch.long)
        elif name == "input_ids":
            inputs[name] = torch.randint(1, 16, shape, generator=generator)
        else:
            raise CaseSkip(f"no rule to build the {name!r} input of shape {shape}")
    return inputs


def _run_call(call: Optional[str]):
    if not call:
        return lambda model, inputs: model(**inputs)
    return lambda model, inputs: getattr(model, call)(**inputs)


class CallWrapper(nn.Module):
    """Makes ``inner.<call>(**inputs)`` the forward, so the discovery probe can run it."""

    def __init__(self, inner: nn.Module, call: str):
        super().__init__()
        self.inner, self.call = inner, call

    def forward(self, **inputs):
        return getattr(self.inner, self.call)(**inputs)


class _StopForward(Exception):
    pass


def truncated_run(consumers: dict[str, int], run: Callable, stop_early: bool):
    """A run whose output is the outputs of the first layers (``{path: calls recorded}``): for
    records whose tiny model fails after its first layer ran (a head or neck that does not fit the
    tiny config), or, with ``stop_early``, for models too costly to run whole on 2 CPU cores."""

    def run_until_first_layers(model, inputs):
        outputs: dict[str, list] = {path: [] for path in consumers}

        def keep(module, args, out, path):
            outputs[path].append(out)
            if stop_early and all(len(outputs[p]) >= n for p, n in consumers.items()):
                raise _StopForward

        handles = [
            model.get_submodule(path).register_forward_hook(functools.partial(keep, path=path)) for path in consumers
        ]
        try:
            run(model, inputs)
        except Exception:  # noqa: BLE001 - the recorded failure after the first layer(s), or the stop
            if not all(outputs.values()):
                raise
        finally:
            for handle in handles:
                handle.remove()
        return outputs

    return run_until_first_layers


MAX_FULL_PARAMS = 5_000_000
MAX_FULL_PIXELS = 3 * 256 * 256


def _heavy(model: nn.Module, inputs: dict) -> bool:
    pixels = max((t[0].numel() for t in inputs.values() if isinstance(t, torch.Tensor) and t.dim() > 1), default=0)
    return sum(p.numel() for p in model.parameters()) > MAX_FULL_PARAMS or pixels > MAX_FULL_PIXELS


def build_case(record: dict, dtype: torch.dtype = torch.float64) -> Case:
    """``record`` made runnable in ``dtype`` (float64, falling back to float32 where a family
    hard-codes float32 somewhere), or :class:`CaseSkip` with the reason."""
    if not has_first_layer(record):
        raise CaseSkip(f"no first layer recorded (status {record['status']!r})")
    try:
        model = build_model(record)
    except CaseSkip:
        raise
    except Exception as exc:  # noqa: BLE001 - reported as the skip reason
        raise CaseSkip(f"tiny model cannot be built here: {type(exc).__name__}: {exc}"[:300]) from None
    consumers = dict(record["direct_pixel_consumers"])
    if record.get("submodule_run"):  # recorded relative to the top-level class, run on a submodule
        prefix = record["submodule_run"] + "."
        consumers = {path.removeprefix(prefix): calls for path, calls in consumers.items()}
    full = _run_call(record.get("call"))
    last_error = None
    for candidate in (dtype, torch.float32) if dtype != torch.float32 else (dtype,):
        inputs = build_inputs(record, candidate)
        model = model.to(candidate)
        runs = [truncated_run(consumers, full, stop_early=True)] if _heavy(model, inputs) else [
            full, truncated_run(consumers, full, stop_early=False)]
        for run in runs:
            try:
                with torch.no_grad():
                    run(model, inputs)
            except Exception as exc:  # noqa: BLE001
                last_error = exc
                continue
            return Case(record, model, inputs, list(consumers), run, candidate, truncated=run is not full)
    raise CaseSkip(f"tiny model does not run on the recorded inputs: {type(last_error).__name__}: {last_error}"[:300])


def build_full_on_meta(record: dict) -> nn.Module:
    """The top-level class of a VLM-tower record on the meta device, text model shrunk."""
    from transformers import AutoConfig

    tower = tower_parts(record)
    config = AutoConfig.for_model(record["model_type"])
    text = getattr(config, "text_config", None)
    if text is not None:
        for name in ("num_hidden_layers", "num_layers"):
            if isinstance(getattr(text, name, None), int):
                setattr(text, name, 1)
    _no_pretrained_backbone(config)
    cls = _transformers_attr(tower["top"], record["model_type"])
    with torch.device("meta"):
        return _instantiate(cls, config)


# ---------------------------------------------------------------------------------------------
# forward / backward helpers


def output_tensors(output) -> list[torch.Tensor]:
    """Floating-point tensors of a model output (ModelOutput, tuple, tensor), in a fixed order."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        values = list(output.values())
    elif isinstance(output, (list, tuple)):
        values = list(output)
    else:
        return []
    return [t for v in values for t in output_tensors(v)]


def scalar_loss(output) -> torch.Tensor:
    """A fixed random projection of every output that depends on the parameters."""
    generator = torch.Generator().manual_seed(2)
    terms = []
    for tensor in output_tensors(output):
        if tensor.requires_grad:
            weights = torch.randn(tensor.shape, generator=generator, dtype=torch.float64).to(tensor.dtype)
            terms.append((tensor * weights).sum())
    if not terms:
        raise AssertionError("no output depends on the parameters")
    return torch.stack([t.to(torch.float64) for t in terms]).sum()


def set_dropout_off(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0


# ---------------------------------------------------------------------------------------------
# oracle through the seen weight


_CONV_OPS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}


@dataclass
class _Call:
    seen: torch.Tensor  # the weight tensor the op received (the parameter, or a transform of it)
    routed: torch.Tensor  # a view of it, whose .grad is the gradient of this call
    patches: torch.Tensor  # oracle patch matrix (groups, N, n)


class _RecordWeightUse(TorchFunctionMode):
    """Inside one layer's forward: every conv/linear op gets a fresh view of its weight that
    retains its gradient, and its input's patch matrix is taken by the independent oracle."""

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func in _CONV_OPS:
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            bound = dict(zip(names, args))
            bound.update(kwargs)
            weight = bound["weight"]
            with torch.random.fork_rng(devices=[]):  # building the probe layers must not move the RNG
                patches = self._patches(func, bound)
            routed = weight.view_as(weight)
            routed.retain_grad()
            self.calls.append(_Call(weight, routed, patches))
            bound["weight"] = routed
            return func(**bound)
        return func(*args, **kwargs)

    @staticmethod
    def _patches(func, bound):
        weight = bound["weight"]
        if func is F.linear:
            geometry = nn.Linear(weight.shape[1], weight.shape[0])
        else:
            geometry = _CONV_OPS[func](
                weight.shape[1] * bound.get("groups", 1),
                weight.shape[0],
                tuple(weight.shape[2:]),
                stride=bound.get("stride", 1),
                padding=bound.get("padding", 0),
                dilation=bound.get("dilation", 1),
                groups=bound.get("groups", 1),
            )
        return patch_matrix_reference(geometry, bound["input"])


@contextlib.contextmanager
def record_weight_use(layer: nn.Module):
    """Collects the calls of ``layer``'s conv/linear ops during the forwards run inside."""
    calls: list[_Call] = []
    original = layer.forward

    def forward(*args, **kwargs):
        with _RecordWeightUse(calls):
            return original(*args, **kwargs)

    layer.forward = forward
    try:
        yield calls
    finally:
        del layer.forward


def first_layer_oracle(layer: nn.Module, calls: list[_Call], lambda_: float) -> torch.Tensor:
    """Σ over calls of TrAct(grad of the seen weight, that call's patches), pulled back to the
    parameter through whatever transform produced the seen weight (after a backward with
    ``retain_graph=True``)."""
    total = torch.zeros_like(layer.weight, dtype=torch.float64)
    for call in calls:
        if call.routed.grad is None:
            continue
        tract = tract_grad_reference(call.routed.grad, call.patches, lambda_)
        if call.seen is layer.weight:
            total += tract
        else:
            (pulled,) = torch.autograd.grad(call.seen, layer.weight, tract.to(call.seen.dtype), retain_graph=True)
            total += pulled.double()
    return total


@contextlib.contextmanager
def record_weight_use_all(layers: dict[str, nn.Module]):
    """:func:`record_weight_use` for several layers: ``{path: calls}``."""
    with contextlib.ExitStack() as stack:
        yield {path: stack.enter_context(record_weight_use(layer)) for path, layer in layers.items()}
