"""Convergence benchmark: what does TrAct buy in optimisation speed and in test accuracy?

TrAct vs plain training on Fashion-MNIST with everything else identical (same initialisation, same data
order, same augmentation draws, same learning-rate schedule), following the protocol of the TrAct paper
(arXiv 2410.23970): every training budget is a separate full run with its own cosine schedule; the learning
rate is the best of a small grid for the *plain* model (validation split) and is reused for TrAct; every run
records the training loss (fixed training slice, eval mode), the test accuracy and the test loss. See
`benchmarks/README.md` for the protocol, the presets and the committed results.

One job per file:

- `presets.py`: settings (`vit-adam-std`, ...), variants (each with its `hf_tract.TrActConfig`), presets;
- `data.py`: the IDX files (Fashion-MNIST, MNIST), the splits, augmentation, preprocessing;
- `models.py`: the tiny ViT / ResNet from transformers configs, a variant applied to the first layer (TrAct,
  patch whitening through `hf_tract.whiten_first_layer`);
- `optimizers.py`: AdamW / SGD / Muon, the first-layer-SGD ablation through `hf_tract.optim`, the schedule;
- `training.py`: the training loop (`fit`), evaluation, one benchmark run;
- `timing.py`: interleaved per-step timing;
- `planning.py`: which runs a preset plans, run keys, command-line overrides of a preset;
- `results.py`: the results JSON (new, resumed, merged, re-timed);
- `cli.py`: the command line; `report.py`: markdown and plots (imports neither torch nor hf_tract).

Usage (from the repository root; `python benchmarks/convergence ...` works the same):

    python -m benchmarks.convergence --quick          # CI smoke test, < 1 minute on 2 CPU cores
    python -m benchmarks.convergence --mode cpu-full  # 30k images, augmentation, ablations, fidelity
    python -m benchmarks.convergence --mode cpu-full --budgets 1,2,4,8,16 --resume   # add a budget
    python -m benchmarks.convergence --report benchmarks/results/convergence_cpu-full.json  # table + plots again

Importing this package imports nothing (the report must load without torch).
"""
