"""Multi-node faults on a simulated Ray cluster (`ray.cluster_utils.Cluster`: a head and worker nodes, each its own
raylet on this machine): the node holding the rollout actors is removed mid-run, then the node holding the learner;
the run, typed as a user types it (`python -m rlft.run` joining the cluster, a relative run folder), finishes with
every rollout batch ingested exactly once, resuming its learner from the newest checkpoint.

The roles are pinned to nodes by custom resources (ray.rollout_resources / ray.learner_resources): once a node is
gone, a replacement offering the same resource joins, as an autoscaler replaces a reclaimed spot node."""

import sys
from pathlib import Path

import pytest
from ray.cluster_utils import Cluster

from rlft.checkpoint import Checkpoint, committed
from rlft.config import ConfigError
from rlft.pipeline import RUN_TOKEN_FILE, check_shared_run_dir
from tests.helpers import read_jsonl, run_with_fault

pytestmark = pytest.mark.slow

EPOCHS, BATCHES_PER_EPOCH = 6, 2  # 16 samples per epoch, rollout batches of 8


def finished_epochs(run_dir: Path) -> int:
    return max((m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl") if "policy_version" in m), default=0)


@pytest.fixture
def cluster():
    """A head for the driver (and Ray Train's controller, the report queue), no worker nodes yet."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    yield cluster
    cluster.shutdown()


def run_on_cluster(cluster: Cluster, model_dir: Path, cwd: Path, run_dir: str, at_epoch: int, fault) -> tuple:
    """`python -m rlft.run` joining `cluster`, with `fault()` called once after epoch `at_epoch` was reported;
    returns (the run's output, the epochs finished when the fault struck)."""
    command = [sys.executable, "-m", "rlft.run", f"env.base_model={model_dir}", f"logging.run_dir={run_dir}",
               f"ray.address={cluster.address}", "env.num_inference_steps=4", "trainer.rollout_batch_size=8",
               "trainer.samples_per_epoch=16", "algo.minibatch_size=8", "eval.num_samples=8", "eval.every=3",
               "ray.rollout_threads=1", "ray.learner_threads=1", "logging.wandb=disabled", "logging.progress=false",
               f"trainer.epochs={EPOCHS}", "trainer.checkpoint_every=1", "ray.num_rollout_workers=2",
               "ray.rollout_resources.rollout_node=1", "ray.learner_resources.learner_node=1",
               "ray.max_learner_failures=2"]  # fmt: skip
    struck_at: list[int] = []

    def strike() -> bool:
        if finished_epochs(cwd / run_dir) >= at_epoch:
            struck_at.append(finished_epochs(cwd / run_dir))
            fault()
        return bool(struck_at)

    output = run_with_fault(command, strike, cwd=cwd)
    assert struck_at[0] < EPOCHS, f"the fault came too late (epoch {struck_at[0]}): {output}"
    return output, struck_at[0]


def assert_each_batch_ingested_once(run_dir: Path) -> Checkpoint:
    """The final checkpoint's buffer saw every epoch's batches once, and the surviving epochs' reports say so."""
    final = Checkpoint.open(committed(run_dir / "checkpoints")[-1])
    assert final.epoch == EPOCHS
    buffer = final.replica(0)["buffer"]
    assert len(buffer["seen"]) == EPOCHS * BATCHES_PER_EPOCH == len(set(buffer["seen"]))
    assert buffer["stats"]["duplicates"] == 0 and buffer["stats"]["added"] == EPOCHS * 16
    by_epoch = {r["epoch"]: r["uids"] for r in read_jsonl(run_dir / "replicas.jsonl")}  # later lines win
    assert sorted(by_epoch) == list(range(1, EPOCHS + 1))
    assert sorted(uid for uids in by_epoch.values() for uid in uids) == sorted(buffer["seen"])
    return final


def test_losing_the_rollout_node_mid_run_restarts_its_actors_elsewhere_and_loses_no_batch(
    cluster, tiny_model_dir, tmp_path
):
    cluster.add_node(num_cpus=2, resources={"learner_node": 1})
    rollout_node = cluster.add_node(num_cpus=2, resources={"rollout_node": 2})
    cluster.wait_for_nodes()

    def replace_rollout_node():
        cluster.remove_node(rollout_node, allow_graceful=False)
        cluster.add_node(num_cpus=2, resources={"rollout_node": 2})

    run_dir = "runs/rollout_node_lost"
    run_on_cluster(cluster, tiny_model_dir, tmp_path, run_dir, at_epoch=2, fault=replace_rollout_node)
    assert_each_batch_ingested_once(tmp_path / run_dir)
    # the learner never stopped: one process did every epoch
    assert len({r["pid"] for r in read_jsonl(tmp_path / run_dir / "replicas.jsonl")}) == 1
    metrics = [m for m in read_jsonl(tmp_path / run_dir / "metrics.jsonl") if "policy_version" in m]
    assert [m["epoch"] for m in metrics] == list(range(1, EPOCHS + 1))


def test_losing_the_learner_node_resumes_from_the_newest_checkpoint_on_another_node(
    cluster, tiny_model_dir, tmp_path
):
    learner_node = cluster.add_node(num_cpus=2, resources={"learner_node": 1})
    cluster.add_node(num_cpus=2, resources={"rollout_node": 2})
    cluster.wait_for_nodes()

    def replace_learner_node():
        cluster.remove_node(learner_node, allow_graceful=False)
        cluster.add_node(num_cpus=2, resources={"learner_node": 1})

    run_dir = tmp_path / "runs/learner_node_lost"
    _, struck_at = run_on_cluster(cluster, tiny_model_dir, tmp_path, "runs/learner_node_lost", at_epoch=2,
                                  fault=replace_learner_node)  # fmt: skip
    final = assert_each_batch_ingested_once(run_dir)
    records = read_jsonl(run_dir / "replicas.jsonl")
    pids = [r["pid"] for r in records]
    assert len(set(pids)) == 2, "the learner was not restarted on the new node"
    # the new learner started from the newest checkpoint (one per epoch): at the epoch after the old learner's last
    # report, or at that epoch again when the old one died between its report and its checkpoint; never earlier
    restarted = records[pids.index(pids[-1])]["epoch"]
    last_old = max(r["epoch"] for r in records if r["pid"] == pids[0])
    assert struck_at <= restarted and last_old <= restarted <= last_old + 1 < EPOCHS + 1, (last_old, restarted)
    assert final.state["policy_version"] == EPOCHS  # one version per epoch across the resume


def test_a_learner_that_does_not_see_the_run_folder_gets_one_line(tmp_path):
    (tmp_path / RUN_TOKEN_FILE).write_text("the driver's token")
    check_shared_run_dir(tmp_path, "the driver's token")
    with pytest.raises(ConfigError, match="storage every node mounts"):
        check_shared_run_dir(tmp_path, "another run's token")
    with pytest.raises(ConfigError, match=f"does not see the run folder {tmp_path / 'elsewhere'}"):
        check_shared_run_dir(tmp_path / "elsewhere", "the driver's token")
