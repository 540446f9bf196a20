"""TrActTrainer end to end; launched by tests/test_distributed.py.

`torchrun --nproc_per_node 2 trainer_e2e.py OUT 4` trains on 2 processes with a batch of 4 per
process and `tract_sync_gram=True`; `python trainer_e2e.py OUT 8` is the single-process run on
the same global batches (sequential sampling: process r gets the r-th block of each global
batch). Both save the model with `save_model`; the test compares the saved weights.

Usage: trainer_e2e.py OUTPUT_DIR PER_DEVICE_BATCH_SIZE [EXTRA_JSON_ARGS [OUTPUT_DIR EXTRA_JSON_ARGS ...]]
(further runs in the same processes, each from the same initial model: one launch, several comparisons).
"""

import json
import os
import sys

import torch

from hf_tract import TrActTrainer, TrActTrainingArguments, tract_layers

from tests.multiproc.tiny import FIRST_LAYER, TinyImages, tiny_vit, trainer_kwargs


def main(output_dir: str, per_device_batch_size: int, extra: dict) -> None:
    options = trainer_kwargs(
        per_device_train_batch_size=per_device_batch_size, max_steps=3, learning_rate=1e-3,
        train_sampling_strategy="sequential", tract_sync_gram=True, ddp_find_unused_parameters=False,
    )  # fmt: skip
    options.update(extra)
    args = TrActTrainingArguments(output_dir=output_dir, **options)
    trainer = TrActTrainer(model=tiny_vit(), args=args, train_dataset=TinyImages(32))
    trainer.train()
    layer = tract_layers(trainer.model)[FIRST_LAYER]
    assert layer.tract_config == args.tract_config.replace(targets=(FIRST_LAYER,))
    trainer.save_model()
    # Every rank writes its own first-layer weight, so the test can check the ranks agree.
    rank = args.process_index
    weight = trainer.accelerator.unwrap_model(trainer.model).get_submodule(FIRST_LAYER).weight.detach()
    # FSDP2 shards the weight (a DTensor): gather it before writing.
    weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
    # Outside the model folder's top level, which must hold only the plain checkpoint.
    os.makedirs(f"{output_dir}/ranks", exist_ok=True)
    torch.save(weight, f"{output_dir}/ranks/first_layer_rank{rank}.pt")
    fsdp_plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    if args.should_save:
        with open(f"{output_dir}/run.json", "w") as f:
            json.dump(
                {
                    "world_size": args.world_size,
                    "parallel_mode": str(args.parallel_mode),
                    "fsdp_version": getattr(fsdp_plugin, "fsdp_version", None),
                    "wrapped_class": type(trainer.model_wrapped).__name__,
                },
                f,
            )


if __name__ == "__main__":
    runs = [(sys.argv[1], sys.argv[3] if len(sys.argv) > 3 else "{}"), *zip(sys.argv[4::2], sys.argv[5::2])]
    for output_dir, extra in runs:
        main(output_dir, int(sys.argv[2]), json.loads(extra))
    # Leave together and close gloo explicitly: a rank exiting while the other still saves, with the process
    # group alive, can abort in gloo's teardown ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
