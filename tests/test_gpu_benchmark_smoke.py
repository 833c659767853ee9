"""benchmarks/gpu_ddpo_epoch.py --tiny: the GPU benchmark's own code, run on CPU, so a GPU session never finds it
broken (GPU time is scarce)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_runs_both_arms_on_a_tiny_unet_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu_ddpo_epoch.json"
    subprocess.run([sys.executable, "benchmarks/gpu_ddpo_epoch.py", "--tiny", "--out", str(out)], cwd=ROOT,
                   check=True, timeout=600, capture_output=True)  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"plain", "rlft"}
    for arm in result["results"].values():
        assert arm["samples"] == 8 and arm["samples_per_s"] > 0 and arm["training_sample_steps_per_s"] > 0
    assert result["speedup"] == result["results"]["rlft"]["samples_per_s"] / result["results"]["plain"]["samples_per_s"]
