"""The replay buffer: torchrl tensor storage with the contract the pipeline relies on.

- capacity in trajectories, FIFO eviction (torchrl's round-robin writer overwrites the oldest entries);
- one pass = every stored trajectory once, in minibatches, reshuffled each pass (sampling without replacement);
- `add` is idempotent per batch uid: a retried rollout never lands twice;
- a staleness bound: trajectories from policy versions older than `version - max_staleness` are evicted.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator

import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.data.replay_buffers import SamplerWithoutReplacement

logging.getLogger("torchrl").setLevel(logging.WARNING)  # torchrl logs every storage initialisation at INFO

SEEN_UIDS_KEPT = 100_000  # uids remembered for idempotency; far more than any buffer holds


class TrajectoryBuffer:
    def __init__(self, capacity: int, minibatch_size: int, max_staleness: int, device: str | torch.device = "cpu"):
        if minibatch_size > capacity:
            raise ValueError(f"minibatch size {minibatch_size} exceeds the buffer capacity {capacity}")
        self.capacity = capacity
        self.minibatch_size = minibatch_size
        self.max_staleness = max_staleness
        self.device = torch.device(device)
        self._buffer = TensorDictReplayBuffer(
            storage=LazyTensorStorage(capacity, device=self.device),
            sampler=SamplerWithoutReplacement(drop_last=False, shuffle=True),
            batch_size=minibatch_size,
        )
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.stats = {"added": 0, "duplicates": 0, "evicted_fifo": 0, "evicted_stale": 0}

    def __len__(self) -> int:
        return len(self._buffer)

    def seen(self, uid: str) -> bool:
        return uid in self._seen

    def add(self, uid: str, batch: TensorDict) -> bool:
        """Store a batch of trajectories once per uid; returns False (and stores nothing) for a repeated uid."""
        if uid in self._seen:
            self.stats["duplicates"] += 1
            return False
        if "policy_version" not in batch:
            raise KeyError("trajectories need a 'policy_version' entry so the buffer can bound staleness")
        self._seen[uid] = None
        if len(self._seen) > SEEN_UIDS_KEPT:
            self._seen.popitem(last=False)
        self.stats["evicted_fifo"] += max(0, len(self) + batch.batch_size[0] - self.capacity)
        self._buffer.extend(batch.to(self.device))
        self.stats["added"] += batch.batch_size[0]
        return True

    def contents(self) -> TensorDict:
        return self._buffer.storage[: len(self)]

    def replace_contents(self, batch: TensorDict) -> None:
        """Swap the stored trajectories (for per-buffer preprocessing such as DDPO advantages)."""
        self._buffer.empty()
        if batch.batch_size[0]:
            self._buffer.extend(batch.to(self.device))

    def evict_stale(self, policy_version: int) -> int:
        """Drop trajectories made by policies more than `max_staleness` versions old; returns how many."""
        if not len(self):
            return 0
        stored = self.contents()
        fresh = stored["policy_version"] >= policy_version - self.max_staleness
        evicted = int((~fresh).sum())
        if evicted:
            self.replace_contents(stored[fresh].clone())
            self.stats["evicted_stale"] += evicted
        return evicted

    def minibatches(self) -> Iterator[TensorDict]:
        """One pass over everything stored, reshuffled, in minibatches (the last one may be smaller)."""
        yield from self._buffer

    # ---- checkpointing: everything a resumed run needs to draw the same minibatches ----
    def state_dict(self) -> dict:
        """Stored trajectories (storage order), writer cursor, sampler permutation, seen uids and stats."""
        return {
            "contents": self.contents().to_dict() if len(self) else None,
            "size": len(self),
            "writer": self._buffer._writer.state_dict(),
            "sampler": dict(self._buffer._sampler.state_dict()),
            "seen": list(self._seen),
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: dict) -> None:
        contents = state["contents"]
        self.replace_contents(TensorDict(contents, batch_size=[state["size"]]) if contents else TensorDict({}, [0]))
        self._buffer._writer.load_state_dict(state["writer"])
        self._buffer._sampler.load_state_dict(state["sampler"])
        self._seen = OrderedDict.fromkeys(state["seen"])
        self.stats = dict(state["stats"])
