"""Benchmarks run with tiny settings, so their code is tested: gpu_ddpo_epoch.py and gpu_group_norm_silu.py on CPU (a
GPU session should never find them broken: GPU time is scarce) and deft_digits_sr.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_runs_both_arms_on_a_tiny_unet_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu_ddpo_epoch.json"
    subprocess.run([sys.executable, "benchmarks/gpu_ddpo_epoch.py", "--tiny", "--out", str(out)], cwd=ROOT,
                   check=True, timeout=600, capture_output=True)  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"plain", "rlft"}
    for arm in result["results"].values():
        assert arm["samples"] == 8 and arm["samples_per_s"] > 0 and arm["training_sample_steps_per_s"] > 0
    rlft, plain = result["results"]["rlft"]["samples_per_s"], result["results"]["plain"]["samples_per_s"]
    assert result["speedups"] == {"rlft / plain": rlft / plain}


def test_the_group_norm_benchmark_times_both_arms_and_checks_rlfts_gradients(tmp_path):
    out = tmp_path / "gpu_group_norm_silu.json"
    subprocess.run([sys.executable, "benchmarks/gpu_group_norm_silu.py", "--tiny", "--out", str(out)], cwd=ROOT,
                   check=True, timeout=600, capture_output=True)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["coverage"] >= 0.95 and set(result["training_speedup_of_rlft"]) == {"eager"}
    for case in result["cases"]:
        assert set(case["times"]) == {"eager", "rlft", "floor"}
        assert all(t["forward_ms"] > 0 and t["training_ms"] > 0 for t in case["times"].values())
        assert max(case["errors"]["rlft"].values()) < 1e-2  # bf16 rounding of the output and input gradient
    weighted = sum(case["times"]["rlft"]["training_ms"] * case["call_sites"] for case in result["cases"])
    assert result["totals"]["rlft"]["training_ms"] == pytest.approx(weighted)


def test_the_deft_benchmark_runs_every_method_and_reports_the_path_objective(tmp_path):
    out = tmp_path / "deft_digits_sr.json"
    subprocess.run([sys.executable, "benchmarks/deft_digits_sr.py", "--epochs", "1", "--supervised-steps", "5",
                    "--base-samples", "64", "--eval-samples", "32", "--zetas", "10", "--dps-tune-samples", "32",
                    "--likelihood-weights", "1,2", "--out", str(out)], cwd=ROOT,
                   check=True, timeout=600, capture_output=True)  # fmt: skip
    result = json.loads(out.read_text())
    methods, tuning = result["methods"], result["lv_likelihood_weight_tuning"]
    assert sorted(tuning) == ["1.0", "2.0"]  # one h-net per likelihood weight, the best on train cases kept
    best = max(tuning, key=lambda w: tuning[w]["train_psnr"])
    lv = f"DEFT log-variance (lambda={float(best):g})"
    supervised = ["DEFT supervised", "DEFT supervised on base-model pairs"]
    assert list(methods) == ["base (unconditional)", "DPS (zeta=10)", lv, *supervised]
    for row in methods.values():
        assert 5 < row["psnr"] < 60 and row["psnr_of_case_mean"] >= row["psnr"] - 1 and row["sample_spread"] > 0
    assert methods[lv]["psnr"] == tuning[best]["heldout_psnr"]
    for name in (lv, *supervised):
        assert methods[name]["control_energy"] > 0 and methods[name]["path_objective"] > 0
    # per-case PSNR of the 6 held-out cases (32 samples, 6 per case), paired between methods on the same cases
    assert all(len(row["case_psnr"]) == 6 for row in methods.values())
    pair = result["paired_psnr"][f"{lv} - DPS (zeta=10)"]
    differences = [a - b for a, b in zip(methods[lv]["case_psnr"], methods["DPS (zeta=10)"]["case_psnr"], strict=True)]
    assert abs(pair["mean_db"] - sum(differences) / 6) < 1e-4 and pair["cases"] == 6
    assert pair["better_cases"] == sum(d > 0 for d in differences) and pair["standard_error_db"] > 0


def test_the_flow_benchmark_counts_samples_and_training_seconds_per_evaluation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the arms' run folders and the JSON stay in the test's folder
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as `python benchmarks/flow_rl.py` has it
    import flow_rl

    path = flow_rl.main(["--quick", "--arms", "grpo", "nft", "--out", str(tmp_path)])
    result = json.loads(path.read_text())
    assert [arm["arm"] for arm in result["arms"]] == ["grpo", "nft"]
    for arm in result["arms"]:
        evaluations = arm["evaluations"]
        assert [e["epoch"] for e in evaluations] == [0, 1, 2] and [e["samples"] for e in evaluations] == [0, 64, 128]
        assert evaluations[0]["train_seconds"] == 0 < evaluations[1]["train_seconds"] < evaluations[2]["train_seconds"]
        reached = next((e for e in evaluations if e["eval/judge/target_fraction"] >= result["target"]), None)
        assert arm["to_target"] == (None if reached is None else {k: reached[k] for k in ("epoch", "samples",
                                                                                         "train_seconds")})
