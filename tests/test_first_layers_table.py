"""Every record of the first-layer survey (tests/data/hf_first_layers_records.json), on its tiny model.

Per record with a first layer:
- discovery: `find_first_layers(model)` finds exactly the recorded layer(s) (for VLM-tower records,
  on the top-level class built on the meta device), and the probe alone, given inputs of the
  recorded shapes, finds them where the survey found them empirically;
- the patched model's forward is bit-identical to an unpatched copy (eval and train mode);
- one backward in train mode gives the TrAct weight gradient (closed-form oracle of tests/oracle.py,
  through the weight the layer's op actually sees), and every other gradient is bit-identical.

Records whose tiny model cannot be built or run here are skipped with the reason.

Memory: one record's model is alive at a time (a module-scoped parametrized fixture: pytest runs
every test of one record, then tears its model down), and the records the survey ran at a default
size are shrunk (`model_zoo.SHRUNK`).
"""

import copy

import pytest
import torch

from hf_tract import apply_tract, find_first_layers
from hf_tract.patching import tract_layers

from tests import model_zoo as zoo
from tests.oracle import relative_error


LAMBDA = 0.1
RECORDS = zoo.load_records()



# The records run by `-m "not slow"`: one per kind of first layer (patchify conv, CNN stem, Conv3d
# on video, two Linears after a LayerNorm).
# Every other record is marked slow (still run in CI: the whole table is the test).
FAST = {"vit", "resnet", "videomae", "perceiver:fourier"}


SLOW = set(RECORDS) - FAST

# Known discovery/patching gaps: key -> reason (strict xfail: a fix in hf_tract flips them).
XFAIL_DISCOVERY: dict[str, str] = {}
XFAIL_GRADIENT: dict[str, str] = {}


def _params(keys, xfails):
    marks = {}
    for key in keys:
        marks[key] = []
        if key in SLOW:
            marks[key].append(pytest.mark.slow)
        if key in xfails:
            marks[key].append(pytest.mark.xfail(reason=xfails[key], strict=True))
    return [pytest.param(key, marks=marks[key], id=key) for key in keys]


def _is_embedding(record):
    return record.get("kind") == "Embedding"


def _grad_cases():
    return sorted(key for key, record in RECORDS.items() if zoo.has_first_layer(record) and not _is_embedding(record))


# ---------------------------------------------------------------------------------------------
# discovery


def _check_discovery(case: zoo.Case) -> None:
    """`find_first_layers` finds the recorded layer(s); where the survey found them empirically, so does the probe
    on inputs of the recorded shapes; and the probe alone (registry and timm metadata off, no example input) finds
    them from the inputs it builds itself."""
    record, model = case.record, case.model
    if zoo.tower_parts(record) is None:
        assert [name for name, _ in find_first_layers(model)] == case.expected
    if zoo.is_empirical(record):
        probed = model if not record.get("call") else zoo.CallWrapper(model, record["call"])
        prefix = "" if probed is model else "inner."
        found = [name for name, _ in find_first_layers(probed, example_inputs=case.inputs)]
        assert found == [prefix + path for path in case.expected]
    assert [name for name, _ in find_first_layers(model, use_registry=False)] == case.expected


@pytest.mark.parametrize("key", _params(sorted(k for k, r in RECORDS.items() if _is_embedding(r)), {}))
def test_embedding_first_layers_are_refused(key):
    """ImageGPT-style records (an `nn.Embedding` over colour ids): no pixel patches, a clear TypeError."""
    try:
        case = zoo.build_case(RECORDS[key])
    except zoo.CaseSkip as exc:
        pytest.skip(str(exc))
    with pytest.raises(TypeError, match="Embedding"):
        apply_tract(case.model, target=case.record["first_layer_path"])


# Two-tower models whose record covers one tower (shared/hf_first_layers.md §7): both must be found.
SECOND_TOWERS = {
    "deepseek_vl_hybrid": ["model.vision_model.embeddings.patch_embedding"],
    "video_llava": ["model.image_tower.embeddings.patch_embedding"],
}


def _tower_keys():
    return sorted(key for key, record in RECORDS.items() if zoo.tower_parts(record) and zoo.has_first_layer(record))


@pytest.mark.parametrize("key", _params(_tower_keys(), XFAIL_DISCOVERY))
def test_discovery_on_the_full_vlm(key):
    """VLM-tower records: the top-level class (meta device, shrunk text model) finds the tower's layer."""
    record = RECORDS[key]
    tower = zoo.tower_parts(record)
    try:
        model = zoo.build_full_on_meta(record)
    except Exception as exc:  # noqa: BLE001 - reported as the skip reason
        pytest.skip(f"top-level {tower['top']} cannot be built on meta here: {type(exc).__name__}: {exc}"[:300])
    found = sorted(name for name, _ in find_first_layers(model))
    expected = [f"{tower['path']}.{path}" for path in record["direct_pixel_consumers"]] + SECOND_TOWERS.get(key, [])
    assert found == sorted(expected)


# ---------------------------------------------------------------------------------------------
# forward and gradient


def _assert_outputs_equal(actual, expected):
    actual, expected = zoo.output_tensors(actual), zoo.output_tensors(expected)
    assert len(actual) == len(expected) > 0
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


@pytest.mark.parametrize("key", _params(_grad_cases(), XFAIL_GRADIENT))
def test_record(key):
    """One record, end to end: discovery (registry, recorded inputs, probe alone), then the patched model's forward
    is bit-identical to the plain one and its first-layer gradient is the closed form."""
    try:
        case = zoo.build_case(RECORDS[key])
    except zoo.CaseSkip as exc:
        pytest.skip(str(exc))
    _check_discovery(case)
    plain = copy.deepcopy(case.model)
    patched = copy.deepcopy(case.model)
    # Stand-alone VLM towers are not a registry entry of their own: patch the recorded path.
    target = case.expected if zoo.tower_parts(case.record) else None
    apply_tract(patched, lambda_=LAMBDA, target=target)
    assert sorted(tract_layers(patched)) == sorted(case.expected)

    with torch.no_grad():  # seeded: some families draw noise even in eval (ViTMAE random masking)
        torch.manual_seed(0)
        patched_eval = case.run(patched, case.inputs)
        torch.manual_seed(0)
        _assert_outputs_equal(patched_eval, case.run(plain, case.inputs))

    for model in (plain, patched):
        zoo.set_dropout_off(model)
        model.train()
    layers = {path: plain.get_submodule(path) for path in case.expected}
    with zoo.record_weight_use_all(layers) as calls:
        torch.manual_seed(0)
        plain_out = case.run(plain, case.inputs)
    torch.manual_seed(0)
    patched_out = case.run(patched, case.inputs)
    _assert_outputs_equal(patched_out, plain_out)

    zoo.scalar_loss(plain_out).backward(retain_graph=True)
    zoo.scalar_loss(patched_out).backward()

    first_weights = {f"{path}.weight" for path in case.expected}
    plain_params = dict(plain.named_parameters())
    for name, param in patched.named_parameters():
        if name in first_weights:
            continue
        reference = plain_params[name].grad
        assert (param.grad is None) == (reference is None), name
        if reference is not None:
            assert torch.equal(param.grad, reference), name

    tolerance = 1e-8 if case.dtype == torch.float64 else 1e-4
    for path, layer in layers.items():
        assert calls[path], f"{path} did not run"
        expected = zoo.first_layer_oracle(layer, calls[path], LAMBDA)
        actual = patched.get_submodule(path).weight.grad
        assert actual is not None and actual.dtype == layer.weight.dtype
        assert relative_error(actual, expected) <= tolerance
        assert not torch.equal(actual, layer.weight.grad)
