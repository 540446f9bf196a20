"""Run `examples/train_image_classification.py` (its `main()`, with the given arguments) and record, per rank,
what a test needs to tell DDP from independent copies, and the DDP settings the example chose; launched by
tests/test_distributed.py with torchrun.

Usage: run_example.py RECORD_DIR -- EXAMPLE_ARGS...

Writes RECORD_DIR/rank{r}.json: the world size the Trainer saw, its global step, a digest of the first
layer's trained weight (identical on every rank under DDP) and `ddp_find_unused_parameters`.
"""

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_image_classification.py"


def main(record_dir: str, example_args: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("train_image_classification", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # dataclasses look their module up there
    spec.loader.exec_module(example)
    sys.argv = [str(EXAMPLE), *example_args]
    trainer = example.main()
    weight = trainer.model.vit.embeddings.patch_embeddings.projection.weight.detach().cpu()
    record = {
        "world_size": trainer.args.world_size,
        "parallel_mode": trainer.args.parallel_mode.value,
        "global_step": trainer.state.global_step,
        # The example turns DDP's search for unused parameters off when every parameter gets a gradient.
        "ddp_find_unused_parameters": trainer.args.ddp_find_unused_parameters,
        "weight_sha256": hashlib.sha256(weight.numpy().tobytes()).hexdigest(),
    }
    os.makedirs(record_dir, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    Path(record_dir, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    separator = sys.argv.index("--")
    main(sys.argv[1], sys.argv[separator + 1 :])
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
