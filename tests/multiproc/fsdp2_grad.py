"""Launched by tests/test_distributed.py with torchrun (2 processes, gloo, CPU).

FSDP2 (`torch.distributed.fsdp.fully_shard`) directly, without accelerate: accelerate 1.15 turns
FSDP on only for accelerator devices (on CPU its FSDP plugin is silently ignored). The model is
patched with TrAct (sync_gram) before sharding; after one step the gathered first-layer weight
gradient must equal float64 single-process TrAct on the concatenated batch.

Usage: fsdp2_grad.py RESULT_JSON
"""

import copy
import json
import sys

import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from hf_tract import apply_tract

from tests.multiproc.grad_sync import LAMBDA, PER_RANK, plain_grad
from tests.multiproc.tiny import FIRST_LAYER, TinyImages, tiny_vit
from tests.oracle import patch_matrix_reference, relative_error, tract_grad_reference


def main(result_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    plain = tiny_vit()
    data = TinyImages(PER_RANK * world)
    model = apply_tract(copy.deepcopy(plain), LAMBDA, sync_gram=True)
    for layer in model.vit.layers:
        fully_shard(layer)
    fully_shard(model)
    model(**data[rank * PER_RANK : (rank + 1) * PER_RANK]).loss.backward()
    grad = model.get_submodule(FIRST_LAYER).weight.grad
    sharded = type(grad).__name__
    grad = grad.full_tensor()
    if rank == 0:
        everything = data[0 : PER_RANK * world]
        layer = plain.get_submodule(FIRST_LAYER)
        reference = tract_grad_reference(plain_grad(plain, everything), patch_matrix_reference(layer, everything["pixel_values"]), LAMBDA)
        with open(result_path, "w") as f:
            json.dump({"grad_type": sharded, "rel_err_vs_global": relative_error(grad, reference)}, f)
    dist.barrier()  # leave together: rank 0 is still writing the result while the others finish
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
