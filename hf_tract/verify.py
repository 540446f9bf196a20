"""Is a saved folder a plain checkpoint? `verify_plain_checkpoint` checks that a model trained with TrAct was saved
as the plain model it is: safetensors weights, no pickled weights, no remote code, no TrAct names, and that it
loads in a separate Python process where hf_tract cannot be imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


# Files a plain checkpoint folder may hold next to weights and config; anything else is reported.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_TRAINING_ARTIFACTS = {"training_args.bin"}


@dataclass
class PlainCheckpointReport:
    """
    Result of [`verify_plain_checkpoint`].

    Attributes:
        weight_files (`list[str]`): The safetensors files found.
        num_tensors (`int`): Number of tensors in them.
        notes (`list[str]`): Facts that are not problems (e.g. `training_args.bin` needs hf_tract to unpickle).
        loaded_class (`str`, *optional*): Class name the clean process loaded.
        logits (`torch.Tensor`, *optional*): Output of the clean process for the given inputs.
    """

    weight_files: list[str] = field(default_factory=list)
    num_tensors: int = 0
    notes: list[str] = field(default_factory=list)
    loaded_class: str | None = None
    logits: torch.Tensor | None = None


# Runs in `python -I` (no cwd, no PYTHONPATH, no user site) with an import blocker, so that a
# successful load proves the folder needs nothing from hf_tract, even with an editable install.
_CLEAN_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys

    class _BlockHfTract:
        def find_spec(self, name, path=None, target=None):
            if name == "hf_tract" or name.startswith("hf_tract."):
                raise ModuleNotFoundError(f"hf_tract is blocked in this process ({name})")
            return None

    sys.meta_path.insert(0, _BlockHfTract())
    try:
        import hf_tract  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("hf_tract could be imported in the clean process")

    import json, os
    import torch, transformers
    from safetensors.torch import load_file, save_file

    folder, inputs_path, result_path = sys.argv[1:4]
    config = transformers.AutoConfig.from_pretrained(folder)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        model_class = transformers.AutoModel
    model = model_class.from_pretrained(folder, use_safetensors=True).eval()
    foreign = sorted({type(m).__module__ for m in model.modules() if "tract" in type(m).__module__.lower()})
    result = {"class": type(model).__name__, "foreign_modules": foreign,
              "hf_tract_loaded": any(k.split(".")[0] == "hf_tract" for k in sys.modules)}
    if inputs_path:
        with torch.no_grad():
            out = model(**load_file(inputs_path))
        logits = out.logits if hasattr(out, "logits") else out[0]
        save_file({"logits": logits.contiguous()}, result_path + ".safetensors")
    with open(result_path, "w") as f:
        json.dump(result, f)
    """
)


def _find_tract_names(obj: Any, path: str = "") -> list[str]:
    """Paths of keys or string values mentioning hf_tract / TrAct in a JSON-like object."""
    hits = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            where = f"{path}.{key}" if path else str(key)
            if "tract" in str(key).lower():
                hits.append(where)
            hits.extend(_find_tract_names(value, where))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            hits.extend(_find_tract_names(value, f"{path}[{index}]"))
    elif isinstance(obj, str) and (obj.startswith("hf_tract") or obj.startswith("TrAct")):
        # Module paths (`hf_tract.modules...`) or class names (`TrActConv2d`); not free text such as paths.
        hits.append(path)
    return hits


def verify_plain_checkpoint(
    folder: str | os.PathLike,
    inputs: dict[str, torch.Tensor] | None = None,
    *,
    load: bool = True,
    timeout: float = 600,
) -> PlainCheckpointReport:
    """
    Check that a saved model folder is a plain `transformers` checkpoint that does not need hf_tract.

    Static checks: `config.json` has no `auto_map` (no remote code) and no key or value naming
    hf_tract / TrAct; the weights are safetensors (no pickled weight files), and no tensor name
    mentions TrAct; there is no Python file. With `load=True` the folder is then loaded with
    `from_pretrained(use_safetensors=True)` in a separate `python -I` process in which importing
    hf_tract is blocked, and `inputs` (if given) are run through it.

    Args:
        folder (`str` or `os.PathLike`): The folder written by `save_pretrained` / `Trainer.save_model`.
        inputs (`dict[str, torch.Tensor]`, *optional*): Model inputs (e.g. `{"pixel_values": x}`);
            the clean process's logits are returned in the report, to compare with the training process.
        load (`bool`, defaults to `True`): Run the clean-process load.
        timeout (`float`, defaults to 600): Seconds allowed for the clean process.

    Returns:
        [`PlainCheckpointReport`]

    Raises:
        `ValueError`: listing every problem found.
    """
    from safetensors import safe_open

    folder = Path(folder)
    problems: list[str] = []
    report = PlainCheckpointReport()
    config_path = folder / "config.json"
    if not config_path.is_file():
        problems.append("no config.json")
    else:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if "auto_map" in config:
            problems.append("config.json has `auto_map` (the model would need trust_remote_code)")
        problems.extend(f"config.json mentions TrAct at `{where}`" for where in _find_tract_names(config))
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".py":
            problems.append(f"Python file {path.name} in the checkpoint")
        elif path.name in _TRAINING_ARTIFACTS:
            report.notes.append(
                f"{path.name} is the pickled training arguments (TrActTrainingArguments, needs hf_tract to "
                "unpickle); from_pretrained does not read it"
            )
        elif path.suffix in _PICKLE_SUFFIXES:
            problems.append(f"pickled file {path.name} (save with safetensors: `safe_serialization=True`)")
        elif path.suffix == ".safetensors":
            report.weight_files.append(path.name)
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                metadata = f.metadata() or {}
            report.num_tensors += len(keys)
            problems.extend(f"tensor `{key}` in {path.name} mentions TrAct" for key in keys if "tract" in key.lower())
            problems.extend(f"{path.name} metadata mentions TrAct at `{w}`" for w in _find_tract_names(metadata))
    if not report.weight_files:
        problems.append("no .safetensors weights")
    if problems:
        raise ValueError(f"{folder} is not a plain checkpoint:\n- " + "\n- ".join(problems))
    if load:
        _load_in_clean_process(folder, inputs, report, timeout)
    return report


def _load_in_clean_process(
    folder: Path, inputs: dict[str, torch.Tensor] | None, report: PlainCheckpointReport, timeout: float
) -> None:
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        inputs_path = ""
        if inputs is not None:
            inputs_path = os.path.join(tmp, "inputs.safetensors")
            save_file({k: v.detach().cpu().contiguous() for k, v in inputs.items()}, inputs_path)
        result_path = os.path.join(tmp, "result.json")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env["HF_HUB_OFFLINE"] = "1"
        proc = subprocess.run(
            [sys.executable, "-I", "-c", _CLEAN_LOAD_SCRIPT, str(folder.resolve()), inputs_path, result_path],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise ValueError(f"{folder} does not load without hf_tract:\n{proc.stderr[-4000:]}{proc.stdout[-2000:]}")
        result = json.loads(Path(result_path).read_text())
        if result["hf_tract_loaded"] or result["foreign_modules"]:
            raise ValueError(f"{folder} pulled in TrAct code when loaded: {result}")
        report.loaded_class = result["class"]
        if inputs is not None:
            report.logits = load_file(result_path + ".safetensors")["logits"]


__all__ = ["PlainCheckpointReport", "verify_plain_checkpoint"]
