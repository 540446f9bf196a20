"""Launched by tests/test_distributed.py with `torchrun --nproc_per_node 2` (gloo, CPU).

One DDP step of a tiny ViT whose patch embedding is patched with TrAct, each rank on its own
half of a global batch. Rank 0 compares the first-layer weight gradient after DDP's all-reduce
with float64 closed-form references computed from the whole batch:

- `sync_gram=True`: TrAct on the concatenated batch (one Gram for everything);
- `sync_gram=False`: the mean over ranks of each rank's TrAct gradient (own Gram).

Usage: grad_sync.py {sync,local} RESULT_JSON
"""

import copy
import json
import sys

import torch
import torch.distributed as dist

from hf_tract import apply_tract

from tests.multiproc.tiny import FIRST_LAYER, TinyImages, tiny_vit
from tests.oracle import patch_matrix_reference, relative_error, tract_grad_reference


LAMBDA = 0.1
PER_RANK = 4


def plain_grad(model, batch):
    """Ordinary first-layer weight gradient of the mean loss over `batch`."""
    model = copy.deepcopy(model).train()
    model(**batch).loss.backward()
    return model.get_submodule(FIRST_LAYER).weight.grad.double()


def main(mode: str, result_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.use_deterministic_algorithms(True)
    plain = tiny_vit()  # same seed on every rank: identical weights
    data = TinyImages(PER_RANK * world)
    batch = data[rank * PER_RANK : (rank + 1) * PER_RANK]

    model = apply_tract(copy.deepcopy(plain), LAMBDA, sync_gram=(mode == "sync"))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp(**batch).loss.backward()
    grad = model.get_submodule(FIRST_LAYER).weight.grad.detach().clone()

    grads = [torch.empty_like(grad) for _ in range(world)]
    dist.all_gather(grads, grad)
    if rank == 0:
        layer = plain.get_submodule(FIRST_LAYER)
        everything = data[0 : PER_RANK * world]
        global_ref = tract_grad_reference(plain_grad(plain, everything), patch_matrix_reference(layer, everything["pixel_values"]), LAMBDA)
        per_rank = []
        for r in range(world):
            part = data[r * PER_RANK : (r + 1) * PER_RANK]
            per_rank.append(tract_grad_reference(plain_grad(plain, part), patch_matrix_reference(layer, part["pixel_values"]), LAMBDA))
        local_ref = sum(per_rank) / world
        # Single-process TrAct (the library itself, not the oracle) on the concatenated batch.
        single = apply_tract(copy.deepcopy(plain), LAMBDA).train()
        single(**everything).loss.backward()
        result = {
            "mode": mode,
            "world_size": world,
            "rel_err_vs_global": relative_error(grad, global_ref),
            "rel_err_vs_local_mean": relative_error(grad, local_ref),
            "rel_err_vs_single_process_library": relative_error(grad, single.get_submodule(FIRST_LAYER).weight.grad),
            "rel_diff_global_vs_local_refs": relative_error(local_ref, global_ref),
            "rel_err_ranks_agree": max(relative_error(g, grads[0]) for g in grads),
        }
        with open(result_path, "w") as f:
            json.dump(result, f)
    dist.barrier()  # leave together: rank 0 is still writing the result while the others finish
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
