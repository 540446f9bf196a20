"""TrActTrainingArguments, TrActTrainer, TrActCallback and tract_model_init on a tiny ViT (CPU)."""

import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import number_of_arguments

from hf_tract import (
    TrActCallback,
    TrActConfig,
    TrActTrainer,
    apply_tract,
    is_tract_applied,
    remove_tract,
    tract_layers,
    tract_model_init,
)
from hf_tract.verify import verify_plain_checkpoint

from tests.conftest import (
    FIRST_LAYER,
    TinyImages,
    first_weight,
    make_args,
    tiny_vit,
    trainer_kwargs,
)
from tests.oracle import patch_matrix_reference, relative_error, tract_grad_reference


# ---------------------------------------------------------------- arguments


def test_trainer_needs_tract_arguments(tmp_path):
    with pytest.raises(TypeError, match="TrActTrainingArguments"):
        TrActTrainer(model=tiny_vit(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


# ---------------------------------------------------------------- end to end


@pytest.mark.slow  # a clean interpreter loads the checkpoint (~10 s)
def test_bf16_train_save_and_load_without_hf_tract(tmp_path):
    """bf16 autocast on CPU, save, reload in a process where hf_tract cannot be imported: same logits."""
    model = tiny_vit()
    plain_keys = set(tiny_vit().state_dict())
    before = first_weight(model)
    args = make_args(tmp_path, max_steps=4, bf16=True, tract_lambda=0.2)
    trainer = TrActTrainer(model=model, args=args, train_dataset=TinyImages())
    assert tract_layers(model)[FIRST_LAYER].tract_lambda == 0.2
    trainer.train()
    assert not torch.equal(first_weight(model), before)
    assert torch.isfinite(first_weight(model)).all()
    trainer.save_model()

    out = tmp_path / "out"
    # Reference logits from a plain fp32 model with the trained weights: the training model's
    # forward is still wrapped by accelerate's bf16 autocast.
    reference = tiny_vit()
    assert set(trainer.model.state_dict()) == plain_keys
    reference.load_state_dict(trainer.model.state_dict())
    inputs = {"pixel_values": TinyImages(4, seed=7).pixel_values}
    with torch.no_grad():
        expected = reference.eval()(**inputs).logits
    report = verify_plain_checkpoint(out, inputs)
    assert report.loaded_class == "ViTForImageClassification"
    assert report.weight_files == ["model.safetensors"]
    assert torch.equal(report.logits, expected)

    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert "tract" in card.data.tags
    assert "| λ (`tract_lambda`) | 0.2 |" in card.text and FIRST_LAYER in card.text
    assert torch.load(out / "training_args.bin", weights_only=False).tract_lambda == 0.2  # our own file


def _sequential_one_step(tmp_path, **overrides):
    """One SGD step (lr 1, no momentum, clipping, decay or schedule) over 8 examples, in file order."""
    model = tiny_vit()
    initial = copy.deepcopy(model)
    args = make_args(
        tmp_path, max_steps=1, optim="sgd", learning_rate=1.0, weight_decay=0.0, max_grad_norm=0.0,
        lr_scheduler_type="constant", train_sampling_strategy="sequential", **overrides,
    )  # fmt: skip
    dataset = TinyImages(8)
    TrActTrainer(model=model, args=args, train_dataset=dataset).train()
    return initial, model, dataset


def _closed_form_grads(initial, dataset, micro_batch, lambda_):
    """Mean over micro-batches of the fp64 closed-form TrAct gradient and of the bias gradient."""
    weights, biases = [], []
    for start in range(0, len(dataset), micro_batch):
        model = copy.deepcopy(initial).train()
        batch = dataset[start : start + micro_batch]
        model(**batch).loss.backward()
        layer = model.get_submodule(FIRST_LAYER)
        patches = patch_matrix_reference(layer, batch["pixel_values"])
        weights.append(tract_grad_reference(layer.weight.grad, patches, lambda_))
        biases.append(layer.bias.grad.double())
    return sum(weights) / len(weights), sum(biases) / len(biases)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_step_matches_closed_form(tmp_path, accumulation):
    """The Trainer's first-layer update is the closed-form TrAct gradient; with gradient accumulation
    it is the mean of the micro-batches' TrAct gradients (each preconditioned with its own Gram)."""
    initial, trained, dataset = _sequential_one_step(
        tmp_path, per_device_train_batch_size=8 // accumulation, gradient_accumulation_steps=accumulation
    )
    expected_w, expected_b = _closed_form_grads(initial, dataset, 8 // accumulation, 0.1)
    layer0, layer1 = initial.get_submodule(FIRST_LAYER), trained.get_submodule(FIRST_LAYER)
    assert relative_error(layer0.weight - layer1.weight, expected_w) < 1e-4
    assert relative_error(layer0.bias - layer1.bias, expected_b) < 1e-4
    plain_w = _closed_form_grads(initial, dataset, 8 // accumulation, 1e12)[0] * 1e12  # λ→∞: λ·TrAct → plain
    assert relative_error(layer0.weight - layer1.weight, plain_w) > 1e-2


def test_use_tract_false_is_plain_trainer(tmp_path):
    model = tiny_vit()
    TrActTrainer(model=model, args=make_args(tmp_path, max_steps=1, use_tract=False), train_dataset=TinyImages())
    assert not is_tract_applied(model)


# ---------------------------------------------------------------- where the patch happens


def test_model_init_path_is_patched(tmp_path):
    built = []

    def model_init():
        built.append(tiny_vit())
        return built[-1]

    args = make_args(tmp_path, max_steps=1, tract_lambda=0.2)
    trainer = TrActTrainer(model_init=model_init, args=args, train_dataset=TinyImages())
    assert is_tract_applied(built[0]) and len(built) == 1
    # What a hyper-parameter search trial does: set values on `args` between model_init and wrapping.
    trainer.args.tract_lambda = 0.3
    trainer.train()
    assert len(built) == 2 and trainer.model is built[1]
    assert tract_layers(built[1])[FIRST_LAYER].tract_lambda == 0.3


@pytest.mark.parametrize("with_trial", [False, True])
def test_tract_model_init_for_plain_trainer(tmp_path, with_trial):
    model_init = (lambda trial: tiny_vit()) if with_trial else (lambda: tiny_vit())
    wrapped = tract_model_init(model_init, 0.2)
    assert number_of_arguments(wrapped) == number_of_arguments(model_init)
    args = TrainingArguments(output_dir=str(tmp_path), **trainer_kwargs(max_steps=1))
    trainer = Trainer(model_init=wrapped, args=args, train_dataset=TinyImages())
    trainer.train()
    assert tract_layers(trainer.model)[FIRST_LAYER].tract_lambda == 0.2


def test_callback_patches_before_wrapping(tmp_path):
    model = tiny_vit()
    args = TrainingArguments(output_dir=str(tmp_path), **trainer_kwargs(max_steps=2))

    class UserTrainer(Trainer):
        pass

    trainer = UserTrainer(model=model, args=args, train_dataset=TinyImages(), callbacks=[TrActCallback(lambda_=0.2)])
    # Patched at the end of __init__, i.e. before train() hands the model to accelerate.
    assert tract_layers(model)[FIRST_LAYER].tract_lambda == 0.2
    before = first_weight(model)
    trainer.train()
    assert not torch.equal(first_weight(model), before)


def test_callback_added_late_fails_clearly(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), **trainer_kwargs(max_steps=1))
    trainer = Trainer(model=tiny_vit(), args=args, train_dataset=TinyImages())
    trainer.add_callback(TrActCallback())
    with pytest.raises(RuntimeError, match="constructor"):
        trainer.train()


# ---------------------------------------------------------------- first-layer optimizer settings


# ---------------------------------------------------------------- training features


@pytest.mark.slow
@pytest.mark.parametrize("tract_optimizer", ["same", "sgd", "same+muon"])
def test_resume_reproduces_uninterrupted_run(tmp_path, tract_optimizer):
    options = dict(
        max_steps=6, save_strategy="steps", save_steps=3, tract_optimizer=tract_optimizer.removesuffix("+muon"),
        tract_learning_rate=0.05 if tract_optimizer == "sgd" else None,
        muon_learning_rate=0.02 if tract_optimizer.endswith("+muon") else None,
    )  # fmt: skip
    full = tiny_vit()
    TrActTrainer(model=full, args=make_args(tmp_path / "a", **options), train_dataset=TinyImages(32)).train()

    resumed = tiny_vit(seed=123)  # different init: everything must come from the checkpoint
    trainer = TrActTrainer(model=resumed, args=make_args(tmp_path / "b", **options), train_dataset=TinyImages(32))
    checkpoint = tmp_path / "a" / "out" / "checkpoint-3"
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        # ViT is saved under legacy key names: vanilla Trainer 5.24 would resume with its initial weights.
        assert set(f.keys()) != set(resumed.state_dict())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 6
    for (name, p_full), (_, p_resumed) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p_full, p_resumed), name


@pytest.mark.slow
def test_gradient_checkpointing_same_result(tmp_path):
    results = []
    for checkpointing in (False, True):
        model = tiny_vit()
        args = make_args(tmp_path / str(checkpointing), max_steps=2, gradient_checkpointing=checkpointing)
        TrActTrainer(model=model, args=args, train_dataset=TinyImages()).train()
        assert model.is_activation_checkpointing == checkpointing
        results.append(model.state_dict())
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_torch_compile_same_result(tmp_path):
    """`torch_compile=True` (aot_eager backend: dynamo + AOT autograd, no C++ toolchain needed)."""
    results = []
    for compiled in (False, True):
        model = tiny_vit()
        args = make_args(tmp_path / str(compiled), max_steps=2, torch_compile=compiled, torch_compile_backend="aot_eager")
        trainer = TrActTrainer(model=model, args=args, train_dataset=TinyImages())
        trainer.train()
        assert is_tract_applied(model)
        if compiled:
            assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
        results.append(model.state_dict())
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_remove_tract_after_training_keeps_weights(tmp_path):
    model = tiny_vit()
    TrActTrainer(model=model, args=make_args(tmp_path, max_steps=1), train_dataset=TinyImages()).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    remove_tract(model)
    assert not is_tract_applied(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert type(model.get_submodule(FIRST_LAYER)) is torch.nn.Conv2d


# ---------------------------------------------------------------- which options a run uses (README table)


def _applied_records(caplog):
    return [r for r in caplog.records if r.name == "hf_tract.patching" and "applied" in r.getMessage()]


def test_model_patch_is_kept_when_arguments_leave_it_unset(tmp_path):
    """apply_tract(model, lambda_=0.3), then TrActTrainer with default arguments: the step uses λ = 0.3."""
    model = apply_tract(tiny_vit(), lambda_=0.3, solve_dtype=torch.float64)
    initial = copy.deepcopy(model)
    remove_tract(initial)
    args = make_args(
        tmp_path, max_steps=1, optim="sgd", learning_rate=1.0, weight_decay=0.0, max_grad_norm=0.0,
        lr_scheduler_type="constant", train_sampling_strategy="sequential", per_device_train_batch_size=8,
    )  # fmt: skip
    dataset = TinyImages(8)
    TrActTrainer(model=model, args=args, train_dataset=dataset).train()
    assert tract_layers(model)[FIRST_LAYER].tract_config == TrActConfig(0.3, (FIRST_LAYER,), False, torch.float64)
    layer0, layer1 = initial.get_submodule(FIRST_LAYER), model.get_submodule(FIRST_LAYER)
    update = layer0.weight - layer1.weight
    assert relative_error(update, _closed_form_grads(initial, dataset, 8, 0.3)[0]) < 1e-4
    assert relative_error(update, _closed_form_grads(initial, dataset, 8, 0.1)[0]) > 1e-3  # 0.1 is visibly different


def test_given_arguments_override_the_model_patch_and_say_so(tmp_path, caplog):
    model = apply_tract(tiny_vit(), lambda_=0.3, solve_dtype=torch.float64)
    with caplog.at_level("INFO", logger="hf_tract"):
        TrActTrainer(model=model, args=make_args(tmp_path, max_steps=1, tract_lambda=0.2), train_dataset=TinyImages())
    # λ from the arguments, the solve dtype (not given) from the model.
    assert tract_layers(model)[FIRST_LAYER].tract_config == TrActConfig(0.2, (FIRST_LAYER,), False, torch.float64)
    assert any("override" in r.getMessage() and "lambda 0.3 -> 0.2" in r.getMessage() for r in caplog.records)


def test_given_target_moves_the_patch(tmp_path):
    other = "classifier"
    model = apply_tract(tiny_vit(), lambda_=0.3)
    TrActTrainer(model=model, args=make_args(tmp_path, max_steps=1, tract_target=other), train_dataset=TinyImages())
    assert list(tract_layers(model)) == [other]
    assert tract_layers(model)[other].tract_config.lambda_ == 0.3  # the rest of the model's patch is kept
    assert type(model.get_submodule(FIRST_LAYER)) is torch.nn.Conv2d


def test_use_tract_false_unpatches_a_patched_model(tmp_path):
    """The baseline of a patched model is plain: TrAct removed, with a warning, and the step is plain SGD."""
    model = apply_tract(tiny_vit(), lambda_=0.3)
    with pytest.warns(UserWarning, match="use_tract=False.*removing TrAct"):
        trainer = TrActTrainer(model=model, args=make_args(tmp_path, max_steps=1, use_tract=False), train_dataset=TinyImages())
    assert not is_tract_applied(model) and "tract" not in (model.model_tags or [])
    assert type(model.get_submodule(FIRST_LAYER)) is torch.nn.Conv2d
    trainer.train()
    assert not is_tract_applied(model)


def test_a_run_patches_once_and_logs_it_once(tmp_path, caplog):
    with caplog.at_level("INFO", logger="hf_tract"):
        trainer = TrActTrainer(model=tiny_vit(), args=make_args(tmp_path, max_steps=2), train_dataset=TinyImages())
        trainer.train()
        trainer.save_model()
    assert len(_applied_records(caplog)) == 1
    # tract_log_stats is off by default: nothing recorded, nothing logged.
    assert not any(key.startswith("tract/") for entry in trainer.state.log_history for key in entry)
    assert not tract_layers(trainer.model)[FIRST_LAYER].tract_stats


def test_model_init_models_are_patched_once_each(tmp_path, caplog):
    with caplog.at_level("INFO", logger="hf_tract"):
        trainer = TrActTrainer(model_init=lambda: tiny_vit(), args=make_args(tmp_path, max_steps=1), train_dataset=TinyImages())
        trainer.train()
    assert len(_applied_records(caplog)) == 2  # the model of __init__, and the one train() builds


def test_infinite_lambda_is_refused_everywhere(tmp_path):
    with pytest.raises(ValueError, match="finite"):
        TrActConfig(lambda_=float("inf"))
    with pytest.raises(ValueError, match="finite"):
        TrActCallback(lambda_=float("inf"))
    with pytest.raises(ValueError, match="finite"):
        tract_model_init(lambda: tiny_vit(), lambda_=float("inf"))
    with pytest.raises(ValueError, match="tract_lambda"):
        make_args(tmp_path, tract_lambda=float("inf"))


def test_callback_reads_tract_arguments_and_keeps_model_patch(tmp_path):
    model = apply_tract(tiny_vit(), lambda_=0.3)
    args = make_args(tmp_path, max_steps=1, tract_solve_dtype="float32")
    Trainer(model=model, args=args, train_dataset=TinyImages(), callbacks=[TrActCallback()])
    assert tract_layers(model)[FIRST_LAYER].tract_config == TrActConfig(0.3, (FIRST_LAYER,), False, torch.float32)


# ---------------------------------------------------------------- several processes


# ---------------------------------------------------------------- the transformers workaround


# ---------------------------------------------------------------- what TrAct does, in the logs


def test_hyperparameter_trial_values_are_used_and_patch_once(tmp_path, caplog):
    """A trial's `tract_*` values reach the model `train()` builds for it, which is patched once: transformers
    calls `call_model_init(trial)` and only then `_hp_search_setup(trial)`, which sets the trial's values on
    `args` (the two steps `Trainer.train(trial=...)` runs first, called here as it calls them)."""
    from transformers.trainer_utils import HPSearchBackend

    built = []

    def model_init(trial=None):
        built.append(tiny_vit())
        return built[-1]

    trainer = TrActTrainer(model_init=model_init, args=make_args(tmp_path, max_steps=1), train_dataset=TinyImages())
    trainer.hp_search_backend = HPSearchBackend.RAY  # what hyperparameter_search sets; RAY trials are dicts
    trial = {"tract_lambda": 0.4}
    with caplog.at_level("INFO", logger="hf_tract"):
        trainer.model = trainer.call_model_init(trial)
        assert not is_tract_applied(built[1])  # not yet: the trial's values are not on args
        trainer._hp_search_setup(trial)
    assert tract_layers(built[1])[FIRST_LAYER].tract_config.lambda_ == 0.4
    assert len(_applied_records(caplog)) == 1
