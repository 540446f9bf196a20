"""Train a tiny ViT with TrActTrainer, checkpointing every 2 steps; optionally SIGKILL itself.

usage: train_until_killed.py OUTPUT_DIR MAX_STEPS [--kill-at STEP] [--resume]
Writes OUTPUT_DIR/final.safetensors with the final weights when training completes.
"""

import argparse
import os
import signal

from safetensors.torch import save_file
from transformers import TrainerCallback

from hf_tract import TrActTrainer, TrActTrainingArguments, is_tract_applied

from tests.multiproc.tiny import TinyImages, tiny_vit, trainer_kwargs


class KillAt(TrainerCallback):
    """Simulates a crash (OOM kill, pre-emption): no Python cleanup, no final save."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        assert is_tract_applied(model), "TrAct must be active while training"
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("max_steps", type=int)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()
    args = TrActTrainingArguments(
        output_dir=options.output_dir,
        **trainer_kwargs(max_steps=options.max_steps, save_strategy="steps", save_steps=2, learning_rate=1e-2),
    )
    callbacks = [KillAt(options.kill_at)] if options.kill_at else []
    trainer = TrActTrainer(model=tiny_vit(), args=args, train_dataset=TinyImages(64), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True if options.resume else None)
    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, os.path.join(options.output_dir, "final.safetensors"))


if __name__ == "__main__":
    main()
