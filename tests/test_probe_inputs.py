"""Dummy inputs for the probe, from forward signatures and (nested) configs."""


import pytest
import torch

from hf_tract.probe_inputs import candidate_inputs

from tests.discovery_cases import build_case


@pytest.mark.parametrize("name", ["xclip_video_text", "vjepa2_frames_per_clip", "vitmatte_4_channel_backbone"])
def test_first_candidate_input_runs_the_whole_model(name):
    """Video and multi-input models: the first dummy input runs the whole forward (no failed-forward
    fallback), with the sizes the nested configs say."""
    model, _ = build_case(name)
    candidate = next(iter(candidate_inputs(model)))
    with torch.no_grad():
        candidate.run(model)
    assert candidate.module_path == ""
    pixels = candidate.pixels[0]
    if name == "vitmatte_4_channel_backbone":
        assert pixels.shape == (1, 4, 32, 32)
    elif name == "vjepa2_frames_per_clip":
        assert pixels.shape == (1, 4, 3, 32, 32)
    else:
        assert pixels.shape == (1, 3, 3, 32, 32)
