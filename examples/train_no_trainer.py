#!/usr/bin/env python
"""Train an image classifier with TrAct in a plain 🤗 Accelerate training loop (no Trainer).

The same task, data, model and defaults as `train_image_classification.py` (whose data and model helpers
and `DEFAULT_TRAINING_ARGS` this script reuses), written as the loop of transformers' `run_image_classification_no_trainer.py`. The
TrAct part is two lines, marked `# TrAct` below:

```python
from hf_tract import apply_tract
apply_tract(model, lambda_=0.1)  # before accelerator.prepare / torch.compile / DDP
```

`--tract_lambda`, `--tract_target`, `--tract_sync_gram` and `--tract_solve_dtype` default to `None`: TrActConfig's
defaults (λ = 0.1, discovered first layer, per-process Gram, automatic solve dtype).

Examples:

```bash
python examples/train_no_trainer.py                                     # offline default, 1 process
accelerate launch --config_file examples/accelerate_configs/<config>.yaml examples/train_no_trainer.py
torchrun --nproc_per_node 2 examples/train_no_trainer.py                # DDP; on CPU without a GPU too
python examples/train_no_trainer.py --use_tract False                   # baseline without TrAct
```
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler


# isort: off
from hf_tract import apply_tract  # TrAct
from hf_tract import tract_config_of, tract_layers
# isort: on
from hf_tract.config import SOLVE_DTYPE_CHOICES
from hf_tract.environment import has_accelerator, launched_processes
from hf_tract.metrics import load_top_k_accuracy

from train_image_classification import (
    DEFAULT_TRAINING_ARGS,
    DataTrainingArguments,
    ModelArguments,
    OneLineErrorParser,
    build_image_processor,
    build_model,
    check_hub_sources,
    collate_fn,
    fail,
    image_mode_of,
    load_image_dataset,
    prepare_splits,
    top_k_for,
)


logger = logging.getLogger(__name__)


_DEFAULTS = DEFAULT_TRAINING_ARGS  # the main script's defaults: one place for both scripts


@dataclass
class LoopArguments:
    """The training loop's settings; the defaults are `train_image_classification.py`'s (`DEFAULT_TRAINING_ARGS`)."""

    output_dir: str = field(default=_DEFAULTS["output_dir"] + "-no-trainer")
    num_train_epochs: int = field(default=_DEFAULTS["num_train_epochs"])
    max_train_steps: int | None = field(default=None, metadata={"help": "Overrides num_train_epochs when set."})
    per_device_train_batch_size: int = field(default=_DEFAULTS["per_device_train_batch_size"])
    per_device_eval_batch_size: int = field(default=_DEFAULTS["per_device_eval_batch_size"])
    learning_rate: float = field(default=_DEFAULTS["learning_rate"])
    weight_decay: float = field(default=_DEFAULTS["weight_decay"])
    lr_scheduler_type: str = field(default=_DEFAULTS["lr_scheduler_type"])
    warmup_ratio: float = field(
        # The main script's `warmup_steps` < 1 is a ratio of the training steps, as in TrainingArguments.
        default=_DEFAULTS["warmup_steps"], metadata={"help": "Share of the training steps spent warming up."}
    )
    gradient_accumulation_steps: int = field(default=1)
    seed: int = field(default=_DEFAULTS["seed"])
    use_cpu: bool = field(
        default=False,
        metadata={"help": "Train on CPU (set by itself when several processes are launched on a machine without GPUs)."},
    )
    use_tract: bool = field(default=True, metadata={"help": "Train the first layer with TrAct."})
    tract_lambda: float | None = field(default=None, metadata={"help": "TrAct's lambda (default: 0.1)."})
    tract_target: str | None = field(
        default=None, metadata={"help": "Dotted name(s) of the layer(s) to patch (default: found automatically)."}
    )
    tract_sync_gram: bool | None = field(
        default=None,
        metadata={"help": "All-reduce the patch Gram across processes (exact global-batch TrAct).", "nargs": "?", "const": True},
    )
    tract_solve_dtype: str | None = field(
        default=None, metadata={"help": "dtype of the solve (default: auto).", "choices": list(SOLVE_DTYPE_CHOICES)}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final model to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repository id (default: the output_dir name)."})


def evaluate(model, dataloader, accelerator, metric, top_k) -> dict[str, float]:
    """Top-k accuracy of `model` over `dataloader`, gathered from every process."""
    model.eval()
    for batch in dataloader:
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"]).logits
        # gather_for_metrics drops the samples duplicated to even out the last batch across processes.
        logits, references = accelerator.gather_for_metrics((logits, batch["labels"]))
        metric.add_batch(predictions=logits.float().cpu().numpy(), references=references.cpu().numpy())
    model.train()
    return metric.compute(top_k=top_k)


def main():
    parser = OneLineErrorParser((ModelArguments, DataTrainingArguments, LoopArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses()

    # Without a GPU, accelerate makes several launched processes DDP only with cpu=True; otherwise each would
    # train its own copy.
    cpu = args.use_cpu or (launched_processes() > 1 and not has_accelerator())
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=args.gradient_accumulation_steps)
    if accelerator.num_processes != launched_processes():
        raise RuntimeError(
            f"{launched_processes()} processes were launched but accelerate set up {accelerator.num_processes}: "
            "they would train independent copies. Pass --use_cpu True on a machine without GPUs."
        )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO if accelerator.is_local_main_process else logging.ERROR,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    logger.info(accelerator.state)
    set_seed(args.seed)

    check_hub_sources(model_args, data_args)
    with accelerator.main_process_first():
        dataset, eval_split, labels = load_image_dataset(data_args, model_args, args.seed)
    model = build_model(model_args, labels)
    image_processor = build_image_processor(model_args, model, dataset["train"], data_args.image_column_name)
    train_dataset, eval_dataset = prepare_splits(
        dataset, eval_split, data_args, image_processor, image_mode_of(model), args.seed
    )

    if args.use_tract:
        try:  # invalid options (λ <= 0, a target that is not a layer, ...): one line, not a traceback
            # TrAct: patch the first layer in place, before accelerator.prepare wraps the model (DDP, FSDP, compile).
            apply_tract(model, lambda_=args.tract_lambda, target=args.tract_target,
                        sync_gram=args.tract_sync_gram, solve_dtype=args.tract_solve_dtype)  # fmt: skip
        except (ValueError, TypeError) as exc:
            fail(str(exc))
        config = tract_config_of(model)
        accelerator.print(f"TrAct is on: {config.describe()}, on {', '.join(tract_layers(model))}.")
    else:
        accelerator.print("TrAct is off (--use_tract False): plain training.")

    train_dataloader = DataLoader(
        train_dataset, shuffle=True, collate_fn=collate_fn, batch_size=args.per_device_train_batch_size
    )
    eval_dataloader = DataLoader(eval_dataset, collate_fn=collate_fn, batch_size=args.per_device_eval_batch_size)

    # As in Trainer: no weight decay on biases and normalization weights.
    no_decay = ("bias", "layernorm.weight", "layer_norm.weight", "norm.weight")
    parameters = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in parameters if not n.endswith(no_decay)], "weight_decay": args.weight_decay},
            {"params": [p for n, p in parameters if n.endswith(no_decay)], "weight_decay": 0.0},
        ],
        lr=args.learning_rate,
    )

    steps_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=math.ceil(args.warmup_ratio * max_train_steps) * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )

    top_k = top_k_for(len(labels))
    # Every process adds the gathered predictions of all processes, so the metric needs no cross-process setup.
    metric = load_top_k_accuracy()
    logger.info(f"{len(train_dataset)} training images, {max_train_steps} steps, evaluation on {eval_split!r}")

    progress_bar = tqdm(range(max_train_steps), disable=not accelerator.is_local_main_process)
    completed_steps = 0
    for epoch in range(num_epochs):
        model.train()
        for batch in train_dataloader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                progress_bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch, refresh=False)
                progress_bar.update(1)
                completed_steps += 1
            if completed_steps >= max_train_steps:
                break
        results = evaluate(model, eval_dataloader, accelerator, metric, top_k)
        logger.info(f"epoch {epoch}: {results}")

    names = " / ".join(f"top-{k}" for k in top_k)
    values = " / ".join(f"{results[f'top{k}_accuracy']:.4f}" for k in top_k)
    accelerator.print(f"\n{names} accuracy on the {eval_split!r} split ({len(eval_dataset)} images): {values}")

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    # The saved weights are plain: TrAct changes no parameter and no state_dict key.
    unwrapped.save_pretrained(
        args.output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save
    )
    if accelerator.is_main_process:
        image_processor.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "all_results.json"), "w") as f:
            json.dump({f"eval_{name}": value for name, value in results.items()}, f, indent=2)
        if args.push_to_hub:
            unwrapped.push_to_hub(args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir)))
            image_processor.push_to_hub(args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir)))
        print(f"Model and image processor saved to {os.path.abspath(args.output_dir)}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
