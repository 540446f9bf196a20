#!/usr/bin/env python
"""Train an image classifier with TrAct using the 🤗 Trainer.

This follows transformers' `examples/pytorch/image-classification/run_image_classification.py`
(HfArgumentParser, `datasets.load_dataset`, an image processor, `Trainer`, `compute_metrics`,
`--push_to_hub`); the TrAct part is `TrActTrainingArguments` (`--use_tract`, `--tract_lambda`,
`--tract_target`, ...) in place of `TrainingArguments`, and `TrActTrainer` in place of `Trainer`.

With no arguments it trains offline, on 2 CPU cores in a few minutes: a small ViT built from config
(one input channel) on the Fashion-MNIST subset embedded in `examples/data/fashion_mnist_small`, and
writes a normal Trainer output folder (plain safetensors weights, config, image processor, model card)
to `outputs/fashion-mnist-vit-tract`, with top-1 / top-5 accuracy in `all_results.json`.

Examples:

```bash
# the default: offline, embedded Fashion-MNIST subset, small ViT from config
python examples/train_image_classification.py

# any Hub dataset / checkpoint when online, standard TrainingArguments flags
python examples/train_image_classification.py --dataset_name uoft-cs/cifar10 --image_column_name img \\
    --model_type vit --config_overrides "image_size=32,patch_size=4,num_channels=3,hidden_size=384" \\
    --output_dir outputs/cifar10-vit-tract --num_train_epochs 100 --bf16 --tract_lambda 0.1

# the same run without TrAct, as a baseline
python examples/train_image_classification.py --use_tract False --output_dir outputs/fashion-mnist-vit

# DDP on 2 CPU processes (gloo), or one process per GPU on a GPU machine
torchrun --nproc_per_node 2 examples/train_image_classification.py
accelerate launch --config_file examples/accelerate_configs/cpu_multi_process.yaml examples/train_image_classification.py
```

Several processes always train one model together (DDP): without a GPU, `TrActTrainingArguments` turns
on `use_cpu` so transformers sets up CPU DDP instead of one independent run per process. Only the main
process prints the accuracy and writes the model card.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    ViTImageProcessor,
)
from transformers.trainer_utils import get_last_checkpoint, set_seed

from hf_tract import TrActTrainer, TrActTrainingArguments, tract_config_of, tract_layers
from hf_tract.environment import HubUnreachableError, check_hub_reachable
from hf_tract.metrics import load_top_k_accuracy


logger = logging.getLogger(__name__)

EMBEDDED_DATASET = Path(__file__).resolve().parent / "data" / "fashion_mnist_small"
# The default model: a 4-layer, 128-wide ViT on 4x4 patches of 7x7 pixels, one input channel (replicating
# grayscale into 3 channels would make the TrAct patch Gram rank-deficient, and costs compute). 7x7 patches:
# 16 tokens instead of 49 make a step ~3x cheaper (accuracy of the default run: DEFAULT_TRAINING_ARGS below).
DEFAULT_CONFIG_OVERRIDES = (
    "image_size=28,patch_size=7,num_channels=1,hidden_size=128,num_hidden_layers=4,"
    "num_attention_heads=4,intermediate_size=256"
)
# TrainingArguments defaults of the no-argument run; any of them can be overridden on the command line.
DEFAULT_TRAINING_ARGS = {
    "output_dir": "outputs/fashion-mnist-vit-tract",
    "do_train": True,
    "do_eval": True,
    # 10 epochs: 83.70% top-1 (15 epochs: 84.58%) for two thirds of the compute. The ViT's forward + backward
    # is ~77% of a step (profile in examples/README.md): fewer steps is what makes the run shorter.
    "num_train_epochs": 10,
    "learning_rate": 2e-3,
    "weight_decay": 0.05,
    "warmup_steps": 0.05,
    "lr_scheduler_type": "cosine",
    "per_device_train_batch_size": 128,
    "per_device_eval_batch_size": 256,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "logging_steps": 20,
    "seed": 0,
    "remove_unused_columns": False,
    "report_to": "none",
    # Pinned memory only speeds up copies to an accelerator; without one, torch warns on every run.
    "dataloader_pin_memory": torch.accelerator.is_available(),
}


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A Hub dataset id or a local dataset folder (parquet, imagefolder, ...). Default: the "
            "embedded Fashion-MNIST subset, unless --train_dir is given."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "An imagefolder with the training images."})
    validation_dir: str | None = field(default=None, metadata={"help": "An imagefolder with the evaluation images."})
    train_val_split: float = field(
        default=0.15,
        metadata={"help": "Fraction of train held out for evaluation when the dataset has no validation/test split."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the training set (quick runs, debugging)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Truncate the evaluation set (quick runs, debugging)."}
    )
    image_column_name: str = field(default="image", metadata={"help": "The column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "The column holding the labels."})
    augment: bool = field(
        # Off by default: on the embedded 28x28 Fashion-MNIST subset with a short schedule the shifts cost
        # accuracy (10 epochs, default ViT: 77.8% top-1 with, 84.6% without).
        default=False, metadata={"help": "Random horizontal flips and shifts of up to 1/8 of the side when training."}
    )


@dataclass
class ModelArguments:
    """Which model to train: a checkpoint to fine-tune, or a model type built from config (from scratch)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A Hub model id or local checkpoint. Default: train from scratch."}
    )
    model_type: str = field(
        default="vit", metadata={"help": "Model type to build from its config when --model_name_or_path is not given."}
    )
    config_overrides: str | None = field(
        default=DEFAULT_CONFIG_OVERRIDES,
        metadata={"help": "Comma-separated key=value config overrides when training from scratch."},
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    image_processor_name: str | None = field(
        default=None,
        metadata={
            "help": "Image processor name or path. From scratch, default: resize + normalize with the mean/std "
            "measured on the training images (TrAct assumes standardized inputs)."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloaded models and datasets."})
    model_revision: str = field(default="main", metadata={"help": "Model revision (branch, tag or commit)."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the one of `hf auth login`)."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow code from the Hub to run on your machine. Only for repositories you have read."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialize a checkpoint's classifier when the number of labels differs."}
    )


def measure_mean_std(dataset: datasets.Dataset, image_column: str, mode: str, max_images: int = 2000):
    """Per-channel mean and std of pixel values in [0, 1] over (the first `max_images` of) a dataset."""
    images = dataset.select(range(min(max_images, len(dataset))))[image_column]
    pixels = np.concatenate(
        [np.asarray(image.convert(mode), dtype=np.float64).reshape(-1, len(mode)) / 255.0 for image in images]
    )
    return pixels.mean(axis=0).round(4).tolist(), pixels.std(axis=0).round(4).tolist()


def random_flip_and_shift(pixel_values: torch.Tensor) -> torch.Tensor:
    """Randomly flip one `(C, H, W)` image horizontally and shift it by up to 1/8 of its side.

    Shifting pads with the border pixels (the background for centred objects such as Fashion-MNIST).
    """
    if torch.rand(()) < 0.5:
        pixel_values = pixel_values.flip(-1)
    _, height, width = pixel_values.shape
    pad = max(1, min(height, width) // 8)
    padded = torch.nn.functional.pad(pixel_values[None], (pad, pad, pad, pad), mode="replicate")[0]
    top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    return padded[:, top : top + height, left : left + width]


def load_image_dataset(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int):
    """Load the dataset and choose the evaluation split.

    Returns:
        `(dataset, eval_split, labels)`: a `DatasetDict` with a `"train"` split, the name of the split to
        evaluate on ("validation" when the dataset has one, else "test", else a `train_val_split` share of
        train; `None` when there is none), and the class names.
    """
    if data_args.dataset_name is not None:
        dataset = datasets.load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir, token=model_args.token
        )
    elif data_args.train_dir is not None:
        data_files = {"train": os.path.join(data_args.train_dir, "**")}
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        dataset = datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)
    else:
        data_args.dataset_name = str(EMBEDDED_DATASET)
        dataset = datasets.load_dataset(data_args.dataset_name, cache_dir=model_args.cache_dir)

    eval_split = next((name for name in ("validation", "test") if name in dataset), None)
    if eval_split is None and data_args.train_val_split > 0:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=seed)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
        eval_split = "validation"
    for column in (data_args.image_column_name, data_args.label_column_name):
        if column not in dataset["train"].column_names:
            raise ValueError(
                f"Column {column!r} not in the dataset (columns: {dataset['train'].column_names}); set "
                "--image_column_name / --label_column_name."
            )
    label_feature = dataset["train"].features[data_args.label_column_name]
    if not isinstance(label_feature, datasets.ClassLabel):
        raise ValueError(f"Column {data_args.label_column_name!r} must be a ClassLabel, got {label_feature}.")
    return dataset, eval_split, label_feature.names


def build_model(model_args: ModelArguments, labels: list[str]):
    """A checkpoint with a classification head for `labels`, or a new model of `model_type` from config."""
    label2id = {label: i for i, label in enumerate(labels)}
    id2label = dict(enumerate(labels))
    if model_args.model_name_or_path is not None:
        config = AutoConfig.from_pretrained(
            model_args.config_name or model_args.model_name_or_path,
            label2id=label2id,  # num_labels follows id2label (given as well, transformers warns)
            id2label=id2label,
            finetuning_task="image-classification",
            **hub_kwargs(model_args),
        )
        try:
            return AutoModelForImageClassification.from_pretrained(
                model_args.model_name_or_path,
                config=config,
                ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
                **hub_kwargs(model_args),
            )
        except RuntimeError as exc:
            if "ignore_mismatched_sizes" not in str(exc):
                raise
            fail(
                f"the classifier of {model_args.model_name_or_path} does not fit the dataset's {len(labels)} classes "
                "(see the load report above); pass --ignore_mismatched_sizes True to start a new classifier head"
            )
    if model_args.config_name is not None:
        config = AutoConfig.from_pretrained(model_args.config_name, **hub_kwargs(model_args))
    else:
        config = AutoConfig.for_model(model_args.model_type)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
    config.num_labels, config.label2id, config.id2label = len(labels), label2id, id2label
    logger.info(f"Training a new {config.model_type} model from scratch: {config}")
    return AutoModelForImageClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)


def hub_kwargs(model_args: ModelArguments) -> dict:
    """The `from_pretrained` keyword arguments that say where and how to load from."""
    return {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }


def image_mode_of(model) -> str:
    """The PIL mode matching the model's input channels ("L" for 1, "RGB" for 3)."""
    num_channels = getattr(model.config, "num_channels", 3)
    if num_channels not in (1, 3):
        raise ValueError(f"Only 1- and 3-channel models are supported by this example, not {num_channels}.")
    return "L" if num_channels == 1 else "RGB"


def build_image_processor(model_args: ModelArguments, model, train_dataset: datasets.Dataset, image_column: str):
    """The image processor of `--image_processor_name` or of the checkpoint, else resize + standardize.

    From scratch, and for a local checkpoint saved without an image processor (`model.save_pretrained` alone),
    the images are resized to the config's `image_size` and standardized with the mean/std measured on the
    training images (TrAct assumes standardized inputs), in the model's number of channels.
    """
    source = model_args.image_processor_name or model_args.model_name_or_path
    if source is not None:
        try:
            return AutoImageProcessor.from_pretrained(source, **hub_kwargs(model_args))
        except OSError:
            if model_args.image_processor_name is not None or not os.path.isdir(source):
                raise
    image_size = getattr(model.config, "image_size", None) or train_dataset[0][image_column].size[0]
    mean, std = measure_mean_std(train_dataset, image_column, image_mode_of(model))
    message = f"size {image_size}, mean {mean}, std {std} (measured on the training images)"
    if source is None:
        logger.info(f"Image processor from the training set: {message}")
    else:
        logger.warning(
            f"{source} has no image processor: using resize + normalize, {message}; pass --image_processor_name "
            "to use the one the checkpoint was trained with."
        )
    return ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=mean, image_std=std)


def make_transform(image_processor, image_column: str, label_column: str, image_mode: str, augment: bool):
    """The `with_transform` function: PIL images to `pixel_values` (augmented for training) and `labels`."""

    def transform(batch):
        images = [image.convert(image_mode) for image in batch[image_column]]
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        if augment:
            pixel_values = torch.stack([random_flip_and_shift(image) for image in pixel_values])
        return {"pixel_values": pixel_values, "labels": batch[label_column]}

    return transform


def prepare_splits(dataset, eval_split, data_args, image_processor, image_mode, seed, do_train=True, do_eval=True):
    """The training and evaluation datasets, truncated as asked and with their transforms set."""
    columns = (data_args.image_column_name, data_args.label_column_name)
    train_dataset = eval_dataset = None
    if do_train:
        train_dataset = dataset["train"]
        if data_args.max_train_samples is not None:
            train_dataset = train_dataset.shuffle(seed=seed).select(range(data_args.max_train_samples))
        train_dataset = train_dataset.with_transform(
            make_transform(image_processor, *columns, image_mode, data_args.augment)
        )
    if do_eval:
        if eval_split is None:
            raise ValueError("Evaluation needs a validation or test split, or --train_val_split > 0.")
        eval_dataset = dataset[eval_split]
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.shuffle(seed=seed).select(range(data_args.max_eval_samples))
        eval_dataset = eval_dataset.with_transform(make_transform(image_processor, *columns, image_mode, False))
    return train_dataset, eval_dataset


def collate_fn(examples):
    """Stack the transformed examples into a batch (`pixel_values`, `labels`)."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


def every_parameter_gets_a_gradient(model, batch: dict) -> bool:
    """Whether one training forward/backward on `batch` gives every trainable parameter a gradient.

    DDP needs `find_unused_parameters=True` (Trainer's default) only for a model with parameters the loss
    does not reach; otherwise it costs a graph traversal per step and a warning. The model is left as it was:
    buffers (BatchNorm statistics) and random state are restored, gradients cleared.
    """
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    was_training = model.training
    with torch.random.fork_rng():
        model.train()
        model(**batch).loss.backward()
    used = all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    return used


def base_model_id(model_args: ModelArguments) -> str | None:
    """The Hub id the run fine-tunes, for the model card's `base_model`; `None` from scratch or from a local folder."""
    name = model_args.model_name_or_path
    return None if name is None or os.path.exists(name) else name


def note_local_base_model(output_dir: str, checkpoint: str):
    """Say in the card that the run fine-tuned a local checkpoint: Trainer's card says "trained from scratch"
    when it has no Hub id to name as the base model. Returns the updated `huggingface_hub.ModelCard`."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(os.path.join(output_dir, "README.md"))
    card.text = card.text.replace(
        "This model was trained from scratch on",
        f"This model was fine-tuned from a local checkpoint (`{Path(checkpoint).name}`, not on the Hub) on",
        1,
    )
    card.save(os.path.join(output_dir, "README.md"))
    return card


def check_hub_sources(model_args: ModelArguments, data_args: DataTrainingArguments) -> None:
    """Stop at once, in one line, when a model or dataset must come from the Hub and the Hub does not answer
    (huggingface_hub alone retries for ~30 s before failing)."""
    model_names = (model_args.model_name_or_path, model_args.config_name, model_args.image_processor_name)
    try:
        for name in (data_args.dataset_name, *model_names):
            if name is not None:
                check_hub_reachable(name)
    except HubUnreachableError as exc:
        fail(str(exc))


def fail(message: str) -> None:
    """Stop with one line on stderr and exit code 2, like a command-line usage error."""
    print(f"{os.path.basename(sys.argv[0])}: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


class OneLineErrorParser(HfArgumentParser):
    """`HfArgumentParser` whose usage errors are one line: its usage lists every TrainingArguments flag."""

    def error(self, message: str) -> None:
        fail(f"{message} (see --help)")


def top_k_for(num_labels: int) -> tuple[int, ...]:
    """Top-1 and top-5, or only top-1 when there are 5 classes or fewer (top-5 would be trivially 1)."""
    return (1, 5) if num_labels > 5 else (1,)


def dataset_display_name(data_args: DataTrainingArguments) -> str:
    """The dataset's name as the model card shows it."""
    if data_args.dataset_name == str(EMBEDDED_DATASET):
        return "fashion_mnist_small (Fashion-MNIST subset embedded in hf_tract)"
    return data_args.dataset_name or data_args.train_dir


def main():
    parser = OneLineErrorParser((ModelArguments, DataTrainingArguments, TrActTrainingArguments))
    parser.set_defaults(**DEFAULT_TRAINING_ARGS)
    try:  # invalid values (`--tract_lambda -1`, ...) are reported as one line, not a traceback
        if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
            model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
        else:
            model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    except (ValueError, TypeError) as exc:
        fail(str(exc))

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    logging.getLogger("hf_tract").setLevel(log_level)
    logger.info(f"Training/evaluation parameters {training_args}")

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info(f"Checkpoint found at {last_checkpoint}, resuming from it.")

    # Seeded before the model is built, as in transformers' script: a from-scratch model starts from the same
    # weights in every run (and in every process).
    set_seed(training_args.seed)
    check_hub_sources(model_args, data_args)
    dataset, eval_split, labels = load_image_dataset(data_args, model_args, training_args.seed)
    model = build_model(model_args, labels)
    image_processor = build_image_processor(model_args, model, dataset["train"], data_args.image_column_name)
    train_dataset, eval_dataset = prepare_splits(
        dataset,
        eval_split,
        data_args,
        image_processor,
        image_mode_of(model),
        training_args.seed,
        do_train=training_args.do_train,
        do_eval=training_args.do_eval,
    )

    top_k = top_k_for(len(labels))
    metric = load_top_k_accuracy()

    def compute_metrics(eval_pred):
        return metric.compute(predictions=eval_pred.predictions, references=eval_pred.label_ids, top_k=top_k)

    if training_args.world_size > 1 and training_args.ddp_find_unused_parameters is None and train_dataset:
        batch = collate_fn([train_dataset[i] for i in range(min(2, len(train_dataset)))])
        training_args.ddp_find_unused_parameters = not every_parameter_gets_a_gradient(model, batch)

    # TrActTrainer patches the first layer (training_args.use_tract / tract_lambda / tract_target /
    # tract_sync_gram / tract_solve_dtype) before anything wraps the model, and adds the TrAct section to the
    # model card; the rest is plain Trainer.
    try:  # a target that is not a layer of the model, ...: one line, not a traceback
        trainer = TrActTrainer(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            compute_metrics=compute_metrics,
            processing_class=image_processor,
            data_collator=collate_fn,
        )
    except (ValueError, TypeError) as exc:
        fail(str(exc))
    tract_config = tract_config_of(model)
    if trainer.is_world_process_zero():
        if tract_config is None:
            print("TrAct is off (--use_tract False): plain training.")
        else:
            print(f"TrAct is on: {tract_config.describe()}, on {', '.join(tract_layers(model))}.")

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        if trainer.is_world_process_zero():
            names = " / ".join(f"top-{k}" for k in top_k)
            values = " / ".join(f"{metrics[f'eval_top{k}_accuracy']:.4f}" for k in top_k)
            print(f"\n{names} accuracy on the {eval_split!r} split ({len(eval_dataset)} images): {values}")

    card_kwargs = {
        "finetuned_from": base_model_id(model_args),
        "tasks": "image-classification",
        "dataset": dataset_display_name(data_args),
        "tags": ["image-classification", "vision"],
    }
    # Trainer's card names `config._name_or_path` as the base model unless it is a local folder. A model built
    # from config has none ("fine-tuned version of []"), and a local checkpoint's path is no Hub model
    # (`base_model: /tmp/...`, a link to https://huggingface.co//tmp/...): point it at the output folder,
    # which Trainer skips.
    if card_kwargs["finetuned_from"] is None:
        model.config._name_or_path = training_args.output_dir
    if training_args.push_to_hub:
        trainer.push_to_hub(**card_kwargs)
    else:
        trainer.create_model_card(**card_kwargs)
    local_base = model_args.model_name_or_path is not None and card_kwargs["finetuned_from"] is None
    if local_base and trainer.is_world_process_zero():
        card = note_local_base_model(training_args.output_dir, model_args.model_name_or_path)
        if training_args.push_to_hub:
            card.push_to_hub(trainer.hub_model_id, token=training_args.hub_token)
    if training_args.do_train and trainer.is_world_process_zero():
        print(f"Model, image processor and model card saved to {os.path.abspath(training_args.output_dir)}")
    return trainer


if __name__ == "__main__":
    main()
