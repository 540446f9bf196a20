"""The package as a whole: its public API, the import graph of its modules, and facts that live in one place."""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hf_tract


REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hf_tract"
MODULES = sorted(
    ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py")
    if "templates" not in path.parts
)


def test_library_modules_import_without_cycles():
    """The module-level imports between hf_tract's modules form a DAG (config at the bottom, trainer/hub on top)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        graph[path.stem] = {
            node.module.split(".")[0]
            for node in tree.body  # module level only: lazy imports inside functions may point anywhere
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        }
    visiting, done = set(), set()

    def visit(name, chain):
        assert name not in visiting, f"import cycle: {' -> '.join(chain + [name])}"
        if name in done or name not in graph:
            return
        visiting.add(name)
        for dependency in graph[name]:
            visit(dependency, chain + [name])
        visiting.discard(name)
        done.add(name)

    for name in graph:
        visit(name, [])
    assert graph["config"] == set()  # everything may build on the config


@pytest.mark.parametrize("name", MODULES)
def test_every_module_says_what_it_exports(name):
    """`__all__` in every module, naming only what exists there, and a docstring saying what the module is for."""
    module = importlib.import_module(name)
    assert module.__doc__ and module.__doc__.strip(), f"{name} has no module docstring"
    assert isinstance(getattr(module, "__all__", None), (list, tuple)), f"{name} has no __all__"
    missing = [export for export in module.__all__ if not hasattr(module, export)]
    assert not missing, f"{name}.__all__ names {missing}, which it does not define"


@pytest.mark.slow  # a fresh interpreter importing torch
def test_public_api_and_lazy_trainer_glue():
    """Importing hf_tract does not import transformers' Trainer (checked in a fresh interpreter); the README's
    names import from the top level, the verifier from its module and from `hf_tract.hub`."""
    code = "import sys, hf_tract; assert 'transformers.trainer' not in sys.modules, 'hf_tract imported the Trainer'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    from hf_tract import TrActCallback, TrActTrainer, TrActTrainingArguments, create_or_update_model_card  # noqa: F401
    from hf_tract.hub import verify_plain_checkpoint
    from hf_tract.verify import verify_plain_checkpoint as verifier

    assert verifier is verify_plain_checkpoint
    assert set(hf_tract.__all__) >= {"apply_tract", "TrActConfig", "TrActTrainer", "TrActTrainingArguments"}


# A fact with one home: the pattern appears in no other file of hf_tract/, examples/ or benchmarks/.
ONE_HOME = [
    # the launcher's process-count variables
    (r"OMPI_COMM_WORLD_SIZE|MV2_COMM_WORLD_SIZE|\bPMI_SIZE", "hf_tract/environment.py"),
    # the solve dtypes a user may name
    (r"""["']float32["'],\s*["']float64["']""", "hf_tract/config.py"),
    # λ's default value
    (r"DEFAULT_LAMBDA\s*=|lambda_\s*:\s*float\s*=\s*0\.|default=0\.1\b", "hf_tract/config.py"),
    # "a number given as the config means λ"
    (r"isinstance\(config, \(?(numbers\.Real|int, float)", "hf_tract/config.py"),
    # the empty-target error
    (r"names no layer", "hf_tract/config.py"),
]


@pytest.mark.parametrize(("pattern", "home"), ONE_HOME, ids=[home + ":" + pattern[:24] for pattern, home in ONE_HOME])
def test_each_fact_has_one_home(pattern, home):
    found = []
    for folder in ("hf_tract", "examples", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            if re.search(pattern, path.read_text(encoding="utf-8")):
                found.append(str(path.relative_to(REPO)))
    strays = [path for path in found if path != home]
    assert not strays, f"{pattern!r} belongs in {home} only; also found in {strays}"
