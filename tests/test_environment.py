"""The launcher environment: how many processes were launched, CPU DDP, independent copies refused."""

import pytest
from transformers import Trainer

from hf_tract import TrActCallback, TrActTrainer, environment
from hf_tract.environment import launched_processes, needs_cpu_ddp, process_rank

from tests.conftest import TinyImages, make_args, tiny_vit


@pytest.mark.parametrize(
    ("variables", "processes", "rank"),
    [({}, 1, 0), ({"WORLD_SIZE": "4", "RANK": "3"}, 4, 3), ({"PMI_SIZE": "2"}, 2, 0), ({"OMPI_COMM_WORLD_SIZE": "8"}, 8, 0)],
)
def test_launched_processes_and_rank_come_from_the_launcher_variables(single_process_env, variables, processes, rank):
    for name, value in variables.items():
        single_process_env.setenv(name, value)
    assert launched_processes() == processes and process_rank() == rank


def test_cpu_ddp_is_chosen_when_processes_were_launched_without_an_accelerator(single_process_env, tmp_path):
    args = make_args(tmp_path, use_cpu=False)
    assert not needs_cpu_ddp(args)  # one process: nothing to do
    single_process_env.setenv("WORLD_SIZE", "2")
    single_process_env.setattr(environment, "has_accelerator", lambda: False)
    assert needs_cpu_ddp(args)
    single_process_env.setattr(environment, "has_accelerator", lambda: True)
    assert not needs_cpu_ddp(args)  # GPUs: accelerate sets up DDP itself


def test_independent_copies_are_refused(single_process_env, tmp_path):
    """Several launched processes but a non-distributed Trainer: an error naming the fix, not N copies."""
    args = make_args(tmp_path)  # set up as a single process
    single_process_env.setenv("WORLD_SIZE", "2")  # what torchrun would set
    with pytest.raises(RuntimeError, match="use_cpu True"):
        TrActTrainer(model=tiny_vit(), args=args, train_dataset=TinyImages())
    trainer = Trainer(model=tiny_vit(), args=args, train_dataset=TinyImages())
    with pytest.raises(RuntimeError, match="use_cpu True"):
        TrActCallback().on_init_end(args, trainer.state, trainer.control, model=trainer.model)
