"""TrActTrainingArguments, TrActTrainer, TrActCallback and tract_model_init on a tiny ViT (CPU)."""

import copy
import json

import pytest
import torch
import yaml
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import number_of_arguments

from hf_tract import TrActConfig, apply_tract, is_tract_applied, remove_tract, tract_layers
from hf_tract.hub import verify_plain_checkpoint
from hf_tract.trainer import (
    CombinedOptimizer,
    TrActCallback,
    TrActTrainer,
    TrActTrainingArguments,
    tract_model_init,
)
from tests.multiproc.tiny import FIRST_LAYER, TinyImages, tiny_vit, trainer_kwargs
from tests.oracle import patch_matrix_reference, relative_error, tract_grad_reference


def make_args(tmp_path, **overrides) -> TrActTrainingArguments:
    return TrActTrainingArguments(output_dir=str(tmp_path / "out"), **trainer_kwargs(**overrides))


def first_weight(model) -> torch.Tensor:
    return model.get_submodule(FIRST_LAYER).weight.detach().clone()


# ---------------------------------------------------------------- arguments


def test_arguments_defaults_and_to_dict(tmp_path):
    args = make_args(tmp_path)
    # The TrActConfig options are "not given" by default: the model's patch, else TrActConfig's defaults.
    assert (args.use_tract, args.tract_lambda, args.tract_target, args.tract_sync_gram) == (True, None, None, None)
    assert args.tract_solve_dtype is None and args.tract_options == {} and args.tract_config == TrActConfig()
    assert args.tract_config.lambda_ == 0.1
    assert args.tract_optimizer == "same" and args.tract_learning_rate is None and args.tract_log_stats is False
    d = args.to_dict()
    for key in ("use_tract", "tract_lambda", "tract_target", "tract_sync_gram", "tract_solve_dtype", "tract_optimizer"):
        assert key in d
    assert json.loads(args.to_json_string())["tract_lambda"] is None


def test_arguments_json_round_trip_keeps_what_was_given(tmp_path):
    """to_json_string -> HfArgumentParser.parse_dict gives the same explicitly-set options, and only them."""
    parser = HfArgumentParser(TrActTrainingArguments)
    cases = [
        ({}, set()),
        ({"tract_lambda": 0.3}, {"lambda_"}),
        ({"tract_target": ["a.b", "c"], "tract_solve_dtype": "float64"}, {"targets", "solve_dtype"}),
        ({"tract_sync_gram": False}, {"sync_gram"}),
    ]
    for given, expected in cases:
        args = make_args(tmp_path, **given)
        (again,) = parser.parse_dict(json.loads(args.to_json_string()))
        assert set(args.tract_options) == expected
        assert again.tract_options == args.tract_options and again.tract_config == args.tract_config


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"tract_lambda": 0.0}, ValueError, "tract_lambda"),
        ({"tract_lambda": -1.0}, ValueError, "tract_lambda"),
        ({"tract_lambda": float("nan")}, ValueError, "tract_lambda"),
        ({"tract_lambda": float("inf")}, ValueError, "tract_lambda.*use_tract=False"),
        ({"tract_lambda": "0.1"}, TypeError, "tract_lambda"),
        ({"tract_lambda": True}, TypeError, "tract_lambda"),
        ({"tract_target": " , "}, ValueError, "tract_target"),
        ({"tract_solve_dtype": "float16"}, ValueError, "tract_solve_dtype"),
        ({"tract_sync_gram": "yes"}, TypeError, "tract_sync_gram"),
        ({"tract_optimizer": "adam"}, ValueError, "tract_optimizer"),
        ({"tract_optimizer": "sgd"}, ValueError, "tract_learning_rate"),
        ({"tract_learning_rate": 0.0}, ValueError, "tract_learning_rate"),
        ({"tract_weight_decay": -0.1}, ValueError, "tract_weight_decay"),
        ({"tract_momentum": 1.0}, ValueError, "tract_momentum"),
    ],
)
def test_arguments_validation(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        make_args(tmp_path, **overrides)


def test_arguments_target_list(tmp_path):
    args = make_args(tmp_path, tract_target=["a.b", "c.d"])
    assert args.tract_target == "a.b,c.d" and args.tract_targets == ("a.b", "c.d")
    assert make_args(tmp_path, tract_target=" a.b ").tract_targets == ("a.b",)
    assert args.tract_config.targets == ("a.b", "c.d")


def test_arguments_cli_json_yaml(tmp_path):
    parser = HfArgumentParser(TrActTrainingArguments)
    cli = [
        "--output_dir", str(tmp_path), "--tract_lambda", "0.2", "--tract_target", "x.y,z",
        "--tract_sync_gram", "--tract_optimizer", "sgd", "--tract_learning_rate", "0.05", "--use_tract", "false",
        "--tract_solve_dtype", "float32", "--tract_log_stats",
    ]  # fmt: skip
    (args,) = parser.parse_args_into_dataclasses(args=cli)
    assert (args.tract_lambda, args.tract_targets, args.tract_sync_gram) == (0.2, ("x.y", "z"), True)
    assert args.tract_config == TrActConfig(0.2, ("x.y", "z"), True, torch.float32) and args.tract_log_stats
    (off,) = parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--tract_sync_gram", "false"])
    assert off.tract_options == {"sync_gram": False}
    assert (args.tract_optimizer, args.tract_learning_rate, args.use_tract) == ("sgd", 0.05, False)

    values = {"output_dir": str(tmp_path), "tract_lambda": 0.05, "tract_sync_gram": True, "tract_weight_decay": 0.0}
    (tmp_path / "a.json").write_text(json.dumps(values))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(values))
    for parsed in (parser.parse_json_file(tmp_path / "a.json")[0], parser.parse_yaml_file(tmp_path / "a.yaml")[0]):
        assert (parsed.tract_lambda, parsed.tract_sync_gram, parsed.tract_weight_decay) == (0.05, True, 0.0)
    for bad in ("0", "inf", "nan"):
        with pytest.raises(ValueError, match="tract_lambda"):
            parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--tract_lambda", bad])


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


def _groups_of(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g.get("name"), g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in optimizer.param_groups]


def test_tract_param_groups(tmp_path):
    model = tiny_vit()
    args = make_args(tmp_path, max_steps=1, tract_learning_rate=1e-2, tract_weight_decay=0.5, weight_decay=0.01)
    trainer = TrActTrainer(model=model, args=args, train_dataset=TinyImages())
    optimizer = trainer.create_optimizer()
    groups = _groups_of(optimizer, model)
    tract_groups = [g for g in groups if g[0] == "tract"]
    assert sorted((g[2], tuple(g[3])) for g in tract_groups) == [
        (0.0, (f"{FIRST_LAYER}.bias",)),
        (0.5, (f"{FIRST_LAYER}.weight",)),
    ]
    assert all(g[1] == 1e-2 for g in tract_groups)
    listed = [n for g in groups for n in g[3]]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    trainer.train()


def test_sgd_ablation_optimizer(tmp_path):
    model = tiny_vit()
    args = make_args(tmp_path, max_steps=2, tract_optimizer="sgd", tract_learning_rate=0.05, tract_momentum=0.5)
    trainer = TrActTrainer(model=model, args=args, train_dataset=TinyImages())
    trainer.train()
    combined = trainer.optimizer.optimizer  # inside accelerate's AcceleratedOptimizer
    assert isinstance(combined, CombinedOptimizer)
    adamw, sgd = combined.optimizers
    weight = model.get_submodule(FIRST_LAYER).weight
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
    assert "momentum_buffer" in sgd.state[weight] and weight not in adamw.state
    assert len(adamw.state) == sum(1 for n, _ in model.named_parameters() if not n.startswith(FIRST_LAYER))
    # The scheduler drives both: linear decay over 2 steps leaves every lr at 0.
    assert all(g["lr"] == 0.0 for g in combined.param_groups)
    assert [g["initial_lr"] for g in sgd.param_groups] == [0.05, 0.05]


def test_combined_optimizer_state_round_trip():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    combined = CombinedOptimizer([torch.optim.AdamW([a], lr=0.1), torch.optim.SGD([b], lr=0.1, momentum=0.9)])
    (a.sum() + b.sum()).backward()
    combined.step()
    state = copy.deepcopy(combined.state_dict())
    restored = CombinedOptimizer([torch.optim.AdamW([a], lr=0.3), torch.optim.SGD([b], lr=0.3, momentum=0.9)])
    restored.load_state_dict(state)
    assert [g["lr"] for g in restored.param_groups] == [0.1, 0.1]
    assert restored.param_groups[1] is restored.optimizers[1].param_groups[0]
    assert torch.equal(restored.optimizers[1].state[b]["momentum_buffer"], combined.optimizers[1].state[b]["momentum_buffer"])
    with pytest.raises(ValueError, match="CombinedOptimizer"):
        restored.load_state_dict(restored.optimizers[0].state_dict())


# ---------------------------------------------------------------- training features


@pytest.mark.slow
@pytest.mark.parametrize("tract_optimizer", ["same", "sgd"])
def test_resume_reproduces_uninterrupted_run(tmp_path, tract_optimizer):
    options = dict(
        max_steps=6, save_strategy="steps", save_steps=3, tract_optimizer=tract_optimizer,
        tract_learning_rate=0.05 if tract_optimizer == "sgd" else None,
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


def test_cpu_ddp_is_chosen_when_processes_were_launched_without_an_accelerator(single_process_env, tmp_path):
    import hf_tract.trainer as trainer_module

    args = make_args(tmp_path, use_cpu=False)
    assert not trainer_module.needs_cpu_ddp(args)  # one process: nothing to do
    single_process_env.setenv("WORLD_SIZE", "2")
    single_process_env.setattr(trainer_module, "_has_accelerator", lambda: False)
    assert trainer_module.needs_cpu_ddp(args)
    single_process_env.setattr(trainer_module, "_has_accelerator", lambda: True)
    assert not trainer_module.needs_cpu_ddp(args)  # GPUs: accelerate sets up DDP itself


def test_independent_copies_are_refused(single_process_env, tmp_path):
    """Several launched processes but a non-distributed Trainer: an error naming the fix, not N copies."""
    import hf_tract.trainer as trainer_module

    args = make_args(tmp_path)  # set up as a single process
    single_process_env.setattr(trainer_module, "_launched_processes", lambda: 2)
    with pytest.raises(RuntimeError, match="use_cpu True"):
        TrActTrainer(model=tiny_vit(), args=args, train_dataset=TinyImages())
    trainer = Trainer(model=tiny_vit(), args=args, train_dataset=TinyImages())
    with pytest.raises(RuntimeError, match="use_cpu True"):
        TrActCallback().on_init_end(args, trainer.state, trainer.control, model=trainer.model)


# ---------------------------------------------------------------- the transformers workaround


def test_transformers_still_needs_the_legacy_key_workaround(tmp_path):
    """Plain `Trainer._load_from_checkpoint` (transformers 5.24) resumes a ViT with its initial weights.

    This test fails once transformers converts legacy key names on resume: then delete
    `hf_tract.trainer._resume_with_converted_legacy_keys` and this test.
    """
    saved = tiny_vit(seed=1)
    saved.save_pretrained(tmp_path / "checkpoint")
    fresh = tiny_vit(seed=2)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), **trainer_kwargs())
    Trainer(model=fresh, args=args)._load_from_checkpoint(str(tmp_path / "checkpoint"))
    lost = [name for name, p in fresh.state_dict().items() if not torch.equal(p, saved.state_dict()[name])]
    assert lost, "transformers fixed it: remove the workaround (_resume_with_converted_legacy_keys)"

    ours = tiny_vit(seed=2)
    TrActTrainer(model=ours, args=make_args(tmp_path / "b"))._load_from_checkpoint(str(tmp_path / "checkpoint"))
    assert all(torch.equal(p, saved.state_dict()[name]) for name, p in ours.state_dict().items())


# ---------------------------------------------------------------- what TrAct does, in the logs


def test_log_stats_at_logging_steps_only(tmp_path):
    model = tiny_vit()
    args = make_args(tmp_path, max_steps=4, logging_steps=2, tract_log_stats=True)
    trainer = TrActTrainer(model=model, args=args, train_dataset=TinyImages(16))
    recorded_at = []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            recorded_at.append(len(model.get_submodule(FIRST_LAYER).tract_stats))

    trainer.add_callback(Spy())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    for entry in logs:
        assert entry["tract/grad_norm_plain"] > 0 and entry["tract/grad_norm"] > 0
        assert entry["tract/condition_bound"] > 1
    # Recorded in the backward of steps 2 and 4 only (one micro-batch each), read and cleared by their log.
    assert recorded_at == [0, 1, 0, 1] and not model.get_submodule(FIRST_LAYER).tract_stats and not model.get_submodule(FIRST_LAYER).tract_record_stats


def test_log_stats_values_match_the_closed_form(tmp_path):
    """One step, one batch: the logged norms are those of the plain and the closed-form TrAct gradient."""
    initial = tiny_vit()
    model = copy.deepcopy(initial)
    args = make_args(
        tmp_path, max_steps=1, logging_steps=1, tract_log_stats=True, per_device_train_batch_size=8,
        train_sampling_strategy="sequential", max_grad_norm=0.0,
    )  # fmt: skip
    dataset = TinyImages(8)
    trainer = TrActTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    (entry,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    probe = copy.deepcopy(initial).train()
    probe(**dataset[0:8]).loss.backward()
    layer = probe.get_submodule(FIRST_LAYER)
    patches = patch_matrix_reference(layer, dataset[0:8]["pixel_values"])
    tract = tract_grad_reference(layer.weight.grad, patches, 0.1)
    assert entry["tract/grad_norm_plain"] == pytest.approx(layer.weight.grad.norm().item(), rel=1e-5)
    assert entry["tract/grad_norm"] == pytest.approx(tract.norm().item(), rel=1e-4)
    bound = 1 + (patches.double() ** 2).sum().item() / (patches.shape[-2] * 0.1)
    assert entry["tract/condition_bound"] == pytest.approx(bound, rel=1e-5)


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
