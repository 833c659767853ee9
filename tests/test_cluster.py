"""Cluster jobs: the shipped cluster YAMLs pass Ray's own config checks; `ray job submit` runs rlft on a Ray head
started on 127.0.0.1; `ray up` / `ray submit` / `ray down` drive a local-provider cluster through an sshd on
127.0.0.1. The Ray heads and the sshd run in private namespaces (tests/sandbox.py), so they touch nothing else
on the machine."""

from __future__ import annotations

import copy
import json
import secrets
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.sandbox import REPO, VENV_BIN, run_in_sandbox, unshare_problem

CLUSTER_YAMLS = sorted((REPO / "cluster").glob("*.yaml"))
TINY = ["env.num_inference_steps=4", "trainer.rollout_batch_size=8", "trainer.samples_per_epoch=16",
        "algo.minibatch_size=8", "eval.num_samples=8", "eval.every=1", "trainer.epochs=1",
        "ray.rollout_threads=1", "ray.learner_threads=1", "ray.num_rollout_workers=1",
        "logging.wandb=disabled", "logging.progress=false"]  # fmt: skip
# Ray's token authentication with a token of the test's own (heads and clients in the sandbox share it)
TOKEN = secrets.token_hex(32)
SANDBOX_ENV = (f"export WANDB_MODE=disabled HF_HUB_OFFLINE=1 RAY_DISABLE_USAGE_STATS=1 RAY_AUTH_MODE=token "
               f"RAY_AUTH_TOKEN={TOKEN}")


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cluster_yamls_pass_rays_config_checks():
    assert {p.name for p in CLUSTER_YAMLS} >= {"aws-gpu.yaml", "onprem.yaml"}
    for path in CLUSTER_YAMLS:
        raw = yaml.safe_load(path.read_text())
        config = prepare_config(copy.deepcopy(raw))
        validate_config(config)
        assert config["provider"]["type"] in ("aws", "local")
        assert "~/rlft" in config["file_mounts"], f"{path.name} does not bring the project to the nodes"
        assert any("-e ~/rlft" in command for command in config["setup_commands"]), f"{path.name} does not install it"
        head_start = " ".join(config["head_start_ray_commands"])
        assert "--dashboard-host=127.0.0.1" in head_start, f"{path.name}: the dashboard must stay on 127.0.0.1"
        starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c), f"{path.name}: no token"
        assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token", f"{path.name}: token not synced"
        assert any("export RAY_AUTH_MODE=token" in c for c in config["setup_commands"]), path.name  # drivers too
        broken = {**raw, "setup_comands": raw["setup_commands"]}  # the checks have teeth: a misspelt key fails
        with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
            validate_config(prepare_config(broken))


def test_the_gpu_example_asks_for_gpu_workers():
    config = prepare_config(yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text()))
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # AWS GPU families


@pytest.mark.slow
def test_ray_job_submit_runs_rlft_on_a_head_at_127_0_0_1(tiny_model_dir, tmp_path):
    problem = unshare_problem()
    assert problem is None, problem
    run_dir = tmp_path / "job_run"
    script = f"""{SANDBOX_ENV}
ray start --head --node-ip-address=127.0.0.1 --port=6379 --include-dashboard=true --dashboard-host=127.0.0.1 \
    --dashboard-port=8265 --num-cpus=2 --disable-usage-stats > {tmp_path}/head.log 2>&1
export RAY_ADDRESS=http://127.0.0.1:8265
ray job submit --submission-id rlft-job --working-dir . -- python -m rlft.run env.base_model={tiny_model_dir} \
    logging.run_dir={run_dir} {" ".join(TINY)}
ray job status rlft-job
ray stop
"""
    result = run_in_sandbox(script, tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "rlft: done" in result.stdout  # the job's own output, streamed back by `ray job submit`
    assert "succeeded" in result.stdout.lower(), result.stdout[-3000:]
    lines = metrics_lines(run_dir)
    assert [m["epoch"] for m in lines if "reward/mean" in m] == [1]
    assert (run_dir / "final" / "policy.safetensors").stat().st_size > 1000


SSHD_CONFIG = """ListenAddress 127.0.0.1
Port 22
HostKey {root}/host_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists(),
                    reason="no sshd: `ray up` with the local provider logs in to 127.0.0.1 over ssh; "
                           "install openssh-server (.ci/run does) to run this test")  # fmt: skip
def test_ray_up_submit_down_with_the_local_provider_on_127_0_0_1(tiny_model_dir, tmp_path):
    problem = unshare_problem()
    assert problem is None, problem
    assert shutil.which("rsync"), "ray up copies file mounts with rsync: install rsync (.ci/run does)"
    ssh = tmp_path / "ssh"
    ssh.mkdir()
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / key)], check=True)
    shutil.copy(ssh / "client_key.pub", ssh / "authorized_keys")
    (ssh / "sshd_config").write_text(SSHD_CONFIG.format(root=ssh))
    # root's home inside the sandbox (a copy of /etc/passwd with another home folder is mounted there): Ray writes
    # its bootstrap files and the synced project into it, and its .bashrc stands in for a machine's prepared
    # environment (the test's venv; the synced project on the path)
    home = tmp_path / "home"
    home.mkdir()
    passwd = tmp_path / "passwd"
    passwd.write_text("".join(
        ":".join([*fields[:5], str(home), *fields[6:]]) if fields[0] == "root" else line
        for line in Path("/etc/passwd").read_text().splitlines(keepends=True) for fields in [line.split(":")]
    ))  # fmt: skip
    (home / ".bashrc").write_text(f'export PATH="{VENV_BIN}:$PATH" PYTHONPATH="$HOME/rlft"\n{SANDBOX_ENV}\n')
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(TOKEN)  # `ray get-auth-token --generate`'s file, which file_mounts syncs
    config = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
    config["cluster_name"] = "rlft-test"
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(ssh / "client_key")}
    # the shipped setup makes a venv and pip-installs the project: here the machine's venv is already prepared
    config["setup_commands"] = [c for c in config["setup_commands"] if "RAY_AUTH_MODE" in c or "auth_token" in c] + [
        "python -c 'import rlft.run, ray; print(\"rlft from\", rlft.__file__)'"]  # fmt: skip
    cluster_yaml = tmp_path / "cluster.yaml"
    cluster_yaml.write_text(yaml.safe_dump(config))
    script = f"""{SANDBOX_ENV}
mkdir -p /run/sshd
/usr/sbin/sshd -f {ssh}/sshd_config -E {tmp_path}/sshd.log
ray up -y --no-config-cache {cluster_yaml}
ray submit {cluster_yaml} cluster/launch.py -- env.base_model={tiny_model_dir} {" ".join(TINY)}
ray down -y {cluster_yaml}
"""
    result = run_in_sandbox(script, tmp_path, timeout=300, binds={"/etc/passwd": passwd})
    output = result.stdout[-5000:] + result.stderr[-5000:]
    assert result.returncode == 0, output
    assert f"rlft from {home}/rlft/rlft/__init__.py" in result.stdout + result.stderr, output  # synced copy
    assert (home / "rlft" / "rlft" / "tune.py").is_file() and not (home / "rlft" / "runs").exists()
    run_dirs = list((home / "runs").iterdir())  # launch.py runs in the head's home
    assert len(run_dirs) == 1, output
    assert [m["epoch"] for m in metrics_lines(run_dirs[0]) if "reward/mean" in m] == [1]
    assert "rlft: done" in result.stdout
