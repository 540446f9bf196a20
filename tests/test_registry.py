"""The first-layer registry (hf_tract/first_layers.json) and timm's metadata."""

import os
import subprocess
import sys


def test_registry_is_built_from_the_committed_survey_records():
    script = os.path.join(os.path.dirname(__file__), "data", "build_first_layer_registry.py")
    assert subprocess.run([sys.executable, script, "--check"], check=False).returncode == 0, (
        "hf_tract/first_layers.json is stale: run python tests/data/build_first_layer_registry.py"
    )
