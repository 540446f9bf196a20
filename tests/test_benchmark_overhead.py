"""CI smoke test of benchmarks/overhead.py: it runs end to end and writes its JSON and markdown.

The benchmark is not a unit test: no timing is checked here, only that every code path executes.
"""

import json

import pytest

from tests.benchmark_scripts import load_benchmark


@pytest.mark.slow
def test_overhead_smoke(tmp_path):
    overhead = load_benchmark("overhead")
    assert overhead.main(["--mode", "smoke", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "overhead_smoke.json").read_text())
    meta = data["meta"]
    for key in ("device", "torch", "transformers", "git_commit", "command"):
        assert meta[key]
    assert not data["errors"]
    assert [s["model"] for s in data["settings"]] == list(overhead.MODELS)
    for setting in data["settings"]:
        variants = setting["variants"]
        assert {"plain", "hf_tract", "hf_tract_f32", "hf_tract_f32r"} <= set(variants)
        assert "official" in variants or "official" in setting["failures"]
        assert variants["plain"]["ratio_median"] == 1.0
        assert all(v["step_ms_median"] > 0 for v in variants.values())
        micro = setting["micro"]
        assert "error" not in micro
        if micro["path"] == "gram":  # the Woodbury path (N < n) has no Gram solve to refine
            assert micro["solve_f32r_ms"] > 0 and micro["solve_f32r_rel_err"] < 1e-3
            assert micro["weight_grad_fp32_ms"] > 0
    assert any(s["micro"]["path"] == "gram" for s in data["settings"])
    markdown = (tmp_path / "overhead_smoke.md").read_text()
    assert "| vit_b16_224 | fp32 |" in markdown and "Micro-breakdown" in markdown
