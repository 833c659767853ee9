"""The replay buffer's contract: idempotent add by uid, FIFO capacity, staleness bound, one pass = each once."""

import pytest
import torch
from tensordict import TensorDict

from rlft.buffer import TrajectoryBuffer


def batch(ids, version: int) -> TensorDict:
    ids = torch.as_tensor(ids)
    return TensorDict({"id": ids, "policy_version": torch.full((len(ids),), version)}, batch_size=[len(ids)])


def stored_ids(buffer: TrajectoryBuffer) -> list[int]:
    return sorted(buffer.contents()["id"].tolist())


def test_add_is_idempotent_per_uid():
    buffer = TrajectoryBuffer(capacity=16, minibatch_size=4, max_staleness=0)
    assert buffer.add("a", batch([0, 1, 2], 0))
    assert not buffer.add("a", batch([0, 1, 2], 0))  # a retried rollout
    assert buffer.add("b", batch([3], 0))
    assert stored_ids(buffer) == [0, 1, 2, 3]
    assert buffer.stats["duplicates"] == 1 and buffer.stats["added"] == 4


def test_capacity_evicts_the_oldest_first():
    buffer = TrajectoryBuffer(capacity=4, minibatch_size=2, max_staleness=10)
    buffer.add("a", batch([0, 1, 2], 0))
    buffer.add("b", batch([3, 4, 5], 0))
    assert stored_ids(buffer) == [2, 3, 4, 5]
    assert buffer.stats["evicted_fifo"] == 2


def test_stale_trajectories_are_evicted():
    buffer = TrajectoryBuffer(capacity=16, minibatch_size=2, max_staleness=1)
    buffer.add("v0", batch([0, 1], 0))
    buffer.add("v1", batch([2, 3], 1))
    buffer.add("v2", batch([4, 5], 2))
    assert buffer.evict_stale(policy_version=2) == 2
    assert stored_ids(buffer) == [2, 3, 4, 5]
    assert buffer.evict_stale(policy_version=2) == 0


def test_one_pass_visits_every_trajectory_once_in_a_new_order_each_pass():
    torch.manual_seed(0)
    buffer = TrajectoryBuffer(capacity=32, minibatch_size=5, max_staleness=0)
    buffer.add("a", batch(list(range(23)), 0))
    orders = []
    for _ in range(3):
        seen = torch.cat([mb["id"] for mb in buffer.minibatches()]).tolist()
        assert sorted(seen) == list(range(23))
        orders.append(seen)
    assert orders[0] != orders[1] or orders[1] != orders[2]


def test_trajectories_need_a_policy_version():
    buffer = TrajectoryBuffer(capacity=4, minibatch_size=2, max_staleness=0)
    with pytest.raises(KeyError, match="policy_version"):
        buffer.add("x", TensorDict({"id": torch.arange(2)}, batch_size=[2]))
