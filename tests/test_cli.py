"""`hf-tract inspect`: one-line errors with exit code 2, close model types without a Hub call, targets
valid for the class reported (video heads too), and video / multi-input models inspected through a
forward that runs (no failed-forward note). Models are built on the meta device from configs."""

import json
import subprocess
import sys
import time

import pytest

from hf_tract.cli import main


pytest.importorskip("transformers")


def _inspect(capsys, *argv):
    code = main(["inspect", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _json(capsys, model, *argv):
    code, out, err = _inspect(capsys, model, "--json", "--batch_size", "2", *argv)
    assert code == 0, err
    return json.loads(out), err


@pytest.mark.parametrize(
    "model_type, model_class, target",
    [
        pytest.param(
            "videomae", "VideoMAEForVideoClassification", "videomae.embeddings.patch_embeddings.projection",
            marks=pytest.mark.slow,
        ),
        pytest.param("vjepa2", "VJEPA2ForVideoClassification", "vjepa2.encoder.embeddings.patch_embeddings.proj", marks=pytest.mark.slow),
        # Text towers index with token ids (.item()): no meta forward, the CPU fallback runs a full-size model.
        pytest.param("xclip", "XCLIPModel", "vision_model.embeddings.patch_embedding", marks=pytest.mark.slow),
        pytest.param("owlvit", "OwlViTModel", "vision_model.embeddings.patch_embedding", marks=pytest.mark.slow),
        ("vit", "ViTForImageClassification", "vit.embeddings.patch_embeddings.projection"),
    ],
)
def test_inspect_reports_a_target_of_the_class_it_names_without_a_failed_forward(capsys, model_type, model_class, target):
    report, err = _json(capsys, model_type)
    assert report["model_class"] == model_class
    assert [layer["name"] for layer in report["layers"]] == [target]
    assert report["model_train_gflops"] > 0  # the example forward ran (on the meta device)
    assert "note:" not in err


@pytest.mark.slow  # a full-size VideoMAE on the meta device, then its example forward
def test_inspect_video_patch_rows_come_from_the_real_input(capsys):
    report, _ = _json(capsys, "videomae")
    # 16 frames, tubelet 2, 224 / 16 = 14: 8 * 14 * 14 patch rows per video.
    assert report["layers"][0]["patch_rows_per_image"] == 8 * 14 * 14
    assert report["layers"][0]["patch_rows_per_step"] == 2 * 8 * 14 * 14


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["vitt"], "did you mean vit"),
        (["./no/such/folder"], "is not a folder with a config.json"),
        (["vit", "--lambda", "-1"], "--lambda"),
        (["vit", "--lambda", "nan"], "--lambda"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(capsys, argv, expected):
    code, out, err = _inspect(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and expected in err
    assert "Traceback" not in err


@pytest.mark.parametrize("value", ["-3", "0", "many"])
def test_batch_size_below_one_is_a_usage_error(capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "vit", "--batch_size", value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "--batch_size" in err and "whole number >= 1" in err


def test_hub_id_offline_is_one_line(capsys, monkeypatch):
    # Set after huggingface_hub was imported (which reads it once): the CLI reads it itself, at call time.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    code, _, err = _inspect(capsys, "someone/not-a-cached-model")
    assert time.perf_counter() - start < 2  # no network attempt, no retries
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "HF_HUB_OFFLINE" in err


def test_unreachable_hub_fails_at_once_naming_offline_mode(capsys, monkeypatch):
    """Without the check, huggingface_hub retries for ~30 s (six log lines) before failing."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    code, out, err = _inspect(capsys, "someone/some-model")
    assert time.perf_counter() - start < 2
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "cannot reach the Hub" in err and "HF_HUB_OFFLINE=1" in err


@pytest.mark.slow  # a subprocess importing torch and transformers
def test_usage_error_is_one_line_and_exit_code_2():
    result = subprocess.run(
        [sys.executable, "-m", "hf_tract.cli", "inspect", "vit", "--batch_size", "many"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--batch_size" in result.stderr


def test_cli_inspect_model_type_json(capsys):
    from hf_tract.cli import main

    assert main(["inspect", "vit", "--json", "--batch_size", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    (layer,) = report["layers"]
    assert layer["name"] == "vit.embeddings.patch_embeddings.projection"
    assert layer["layer_class"] == "Conv2d"
    assert layer["weight_shape"] == [768, 3, 16, 16]
    assert layer["n"] == 3 * 16 * 16 and layer["groups"] == 1
    assert layer["patch_rows_per_image"] == (224 // 16) ** 2
    assert layer["patch_rows_per_step"] == 8 * 196
    assert layer["gram_gflops"] == pytest.approx(2 * 8 * 196 * 768**2 / 1e9)
    assert 0 < layer["gram_gflops"] < report["model_train_gflops"]


def test_cli_inspect_local_folder_and_text_output(tmp_path, capsys):
    from transformers import ViTConfig

    from hf_tract.cli import main

    ViTConfig(image_size=32, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=1,
              num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--lambda", "0.2", "--batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert "vit.embeddings.patch_embeddings.projection" in out
    assert "n (Gram size) 16" in out
    assert "N = 256 per step" in out  # 4 images x 8x8 patches
    assert "apply_tract(model, lambda_=0.2, target='vit.embeddings.patch_embeddings.projection')" in out
