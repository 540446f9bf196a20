"""Multi-process TrAct on CPU: 2 processes, gloo on loopback, launched with torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml


REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tests" / "multiproc"
FIRST_WEIGHT = "vit.embeddings.patch_embeddings.projection.weight"


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _run(command: list, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, env={**_env(), **env}, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def torchrun(script: str, *args: str, nproc: int = 2, **env) -> subprocess.CompletedProcess:
    # --standalone: rendezvous on localhost with a free port, so parallel runs do not collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return _run([*command, str(SCRIPTS / script), *args], **env)


EXAMPLE_ARGS = [
    "--config_overrides", "image_size=28,patch_size=7,num_channels=1,hidden_size=32,num_hidden_layers=1,"
    "num_attention_heads=2,intermediate_size=64",
    "--max_train_samples", "64", "--max_eval_samples", "32", "--per_device_train_batch_size", "16",
    "--num_train_epochs", "1", "--logging_steps", "1", "--report_to", "none", "--log_level", "info",
]  # fmt: skip


@pytest.mark.multiproc
@pytest.mark.slow
def test_example_under_torchrun_without_gpu_is_ddp(tmp_path):
    """`torchrun --nproc_per_node 2 examples/train_image_classification.py` on CPU (no `--use_cpu`): one model
    trained by both processes (same weights, half the steps of one process), one result line, one card."""
    out = tmp_path / "out"
    proc = torchrun(
        "run_example.py", str(tmp_path / "records"), "--", "--output_dir", str(out), *EXAMPLE_ARGS,
        CUDA_VISIBLE_DEVICES="",
    )  # fmt: skip
    records = [json.loads((tmp_path / "records" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in records] == [2, 2] and records[0]["parallel_mode"] == "distributed"
    # 64 images, 16 per process: 4 steps in one process, 2 in DDP over 2.
    assert [r["global_step"] for r in records] == [2, 2]
    assert records[0]["weight_sha256"] == records[1]["weight_sha256"]
    output = proc.stdout + proc.stderr
    assert output.count("accuracy on the 'test' split") == 1  # only the main process prints the result
    assert output.count("applied to the first layer") == 1
    assert output.count("training with CPU DDP") == 1
    assert "process group is initialized, but parallel_mode" not in output
    # Every parameter of the ViT gets a gradient: the example turns DDP's unused-parameter search off (no warning).
    assert records[0]["ddp_find_unused_parameters"] is False
    assert "find_unused_parameters=True was specified" not in output
    assert "- tract" in (out / "README.md").read_text()


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "local"])
def test_ddp_first_layer_gradient(tmp_path, mode):
    """sync_gram: DDP grad == single-process TrAct on the concatenated batch; otherwise the mean of
    the per-rank TrAct grads. References are float64 closed forms (tests/oracle.py)."""
    result_path = tmp_path / "result.json"
    torchrun("grad_sync.py", mode, str(result_path))
    result = json.loads(result_path.read_text())
    assert result["world_size"] == 2 and result["rel_err_ranks_agree"] == 0.0
    # The two references differ a lot on this data, so matching one of them is informative.
    assert result["rel_diff_global_vs_local_refs"] > 0.1
    if mode == "sync":
        assert result["rel_err_vs_global"] <= 1e-6
        assert result["rel_err_vs_single_process_library"] <= 1e-6
    else:
        assert result["rel_err_vs_local_mean"] <= 1e-6


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _update_error(a: dict, b: dict, initial: dict, keys) -> float:
    """Relative distance of two runs' weight updates (initial → trained) over `keys`."""
    da = torch.cat([(a[k] - initial[k]).flatten() for k in keys])
    db = torch.cat([(b[k] - initial[k]).flatten() for k in keys])
    return ((da - db).norm() / db.norm()).item()


@pytest.mark.multiproc
@pytest.mark.slow
def test_trainer_two_processes_equals_single_process(tmp_path):
    """TrActTrainer under torchrun (2 × batch 4, tract_sync_gram) reproduces the single-process
    run with batch 8; without sync_gram the first layer ends up visibly different."""
    from hf_tract.hub import verify_plain_checkpoint

    from tests.conftest import tiny_vit

    # One launch, two runs: with the Gram all-reduced, then without.
    muon = '{"muon_learning_rate": 0.02}'  # and Muon for the hidden weights (DDP averages their gradients too)
    torchrun("trainer_e2e.py", str(tmp_path / "ddp_sync"), "4", "{}", str(tmp_path / "ddp_local"), '{"tract_sync_gram": false}',
             str(tmp_path / "ddp_muon"), muon)  # fmt: skip
    _run([sys.executable, str(SCRIPTS / "trainer_e2e.py"), str(tmp_path / "single"), "8", "{}", str(tmp_path / "single_muon"), muon])

    run = json.loads((tmp_path / "ddp_sync" / "run.json").read_text())
    assert run["world_size"] == 2 and run["wrapped_class"] == "DistributedDataParallel"
    tiny_vit().save_pretrained(tmp_path / "initial")
    initial, single = _weights(tmp_path / "initial"), _weights(tmp_path / "single")
    synced, local = _weights(tmp_path / "ddp_sync"), _weights(tmp_path / "ddp_local")
    assert _update_error(synced, single, initial, [FIRST_WEIGHT]) < 1e-5
    assert _update_error(synced, single, initial, sorted(single)) < 1e-4
    assert _update_error(local, single, initial, [FIRST_WEIGHT]) > 0.1
    muon_ddp, muon_single = _weights(tmp_path / "ddp_muon"), _weights(tmp_path / "single_muon")
    # torch's Muon orthogonalises in bfloat16, which turns the all-reduce's rounding into ~1e-2 (measured 1.3e-2);
    # per-rank gradients would make the ranks drift apart by far more. Muon vs no Muon: 1.7.
    assert _update_error(muon_ddp, muon_single, initial, sorted(single)) < 0.05
    assert _update_error(muon_single, single, initial, sorted(single)) > 0.5
    ranks = [torch.load(tmp_path / "ddp_muon" / "ranks" / f"first_layer_rank{r}.pt") for r in range(2)]
    assert torch.equal(ranks[0], ranks[1])
    ranks = [torch.load(tmp_path / "ddp_sync" / "ranks" / f"first_layer_rank{r}.pt") for r in range(2)]
    assert torch.equal(ranks[0], ranks[1])
    verify_plain_checkpoint(tmp_path / "ddp_sync", load=False)
    assert "| Gram synchronised across processes (`tract_sync_gram`) | yes |" in (tmp_path / "ddp_sync" / "README.md").read_text()


CONFIGS = REPO / "examples" / "accelerate_configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(CONFIGS / name)
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert config.distributed_type.value == raw["distributed_type"]
    assert config.num_processes == raw["num_processes"]
    if raw["distributed_type"] == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
    if raw["num_machines"] == 1:
        # Not a machine-specific count such as 8: the header says to set it (or pass --num_processes).
        header = (CONFIGS / name).read_text().split("compute_environment")[0]
        assert raw["num_processes"] == 1 or (raw["num_processes"] == 2 and "num_processes" in header)


def test_cpu_multi_process_config_starts_several_processes():
    """accelerate starts several local processes only through its multi-GPU launcher (MULTI_CPU or --cpu start
    one); without GPUs TrActTrainingArguments then turns on use_cpu, i.e. CPU DDP."""
    raw = yaml.safe_load((CONFIGS / "cpu_multi_process.yaml").read_text())
    assert raw["distributed_type"] == "MULTI_GPU" and raw["num_processes"] == 2 and raw["use_cpu"] is True


@pytest.mark.multiproc
@pytest.mark.slow
def test_fsdp2_first_layer_gradient(tmp_path):
    """FSDP2 `fully_shard` on CPU/gloo (torch directly: accelerate enables FSDP only on accelerators).
    Patched before sharding, with sync_gram: the sharded gradient, gathered, is single-process TrAct
    on the concatenated batch."""
    result_path = tmp_path / "result.json"
    torchrun("fsdp2_grad.py", str(result_path))
    result = json.loads(result_path.read_text())
    assert result["grad_type"] == "DTensor"
    assert result["rel_err_vs_global"] <= 1e-6


@pytest.mark.gpu
@pytest.mark.multiproc
@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate enables FSDP only on accelerator devices")
def test_trainer_fsdp2_on_gpu(tmp_path):
    """TrActTrainer with accelerate FSDP2 (`fsdp_config.version=2`) on up to 2 GPUs, saved and plain."""
    from hf_tract.hub import verify_plain_checkpoint

    fsdp = {"fsdp": "full_shard", "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["ViTLayer"]}, "use_cpu": False}
    torchrun("trainer_e2e.py", str(tmp_path / "fsdp"), "4", json.dumps(fsdp), nproc=min(2, torch.cuda.device_count()))
    run = json.loads((tmp_path / "fsdp" / "run.json").read_text())
    assert run["fsdp_version"] == 2
    verify_plain_checkpoint(tmp_path / "fsdp", load=False)
