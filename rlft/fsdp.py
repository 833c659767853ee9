"""FSDP learners (ray.learner_parallelism=fsdp): the network's parameters, gradients and optimizer state sharded across
the learner replicas with torch FSDP2 (`fully_shard`), and the full tensors that whatever reads the weights sees.

Each replica holds one shard (about 1 / num_learners) of every parameter, as a DTensor. A block gathers its full
parameters from every replica just before it runs and frees them after (its gradients are reduce-scattered in the
backward pass), so every network call is a collective: every replica must make the same calls in the same order,
with or without gradients (`LearnerContext.spare_calls` evens out the calls whose number depends on a replica's own
data). The weights published to the rollout workers and written to checkpoints are full tensors (`full`), and a
checkpoint holds the full optimizer state as DDP writes it, so either kind of learner resumes either's checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def shard_network(network: nn.Module, mesh) -> None:
    """Shard `network` in place. Each block of its top-level module lists (a UNet's down and up blocks, a
    transformer's blocks) and its mid block is a unit of its own, so only one block's full parameters exist at a
    time; the root unit holds the rest (embeddings, the first and the last layers)."""
    for name, child in network.named_children():
        blocks = child if isinstance(child, nn.ModuleList) else [child] if name == "mid_block" else []
        for block in blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(network, mesh=mesh)


def shard_policy(policy, device: torch.device) -> None:
    """Shard the policy's network across the replicas of the initialised process group, and its frozen reference
    copy (a KL penalty's base model) too: it is as large, and every replica calls it alike."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the mesh's device: one per learner
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    shard_network(policy.unet, mesh)
    if policy.reference_unet is not None:
        shard_network(policy.reference_unet, mesh)


def local_numel(module: nn.Module) -> int:
    """Parameter elements this replica holds (its shards of sharded parameters)."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters())


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full tensor, gathered from every replica's shard (a collective); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state(state: Any) -> Any:
    """A nested state (an optimizer's state dict) with every DTensor in it gathered into its full tensor. Every
    replica must call it at once, on the same structure (dicts are walked in their order)."""
    if isinstance(state, dict):
        return {key: full_state(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(full_state(value) for value in state)
    return full(state) if isinstance(state, torch.Tensor) else state


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full tensor `value` as `like` is held: this replica's shard of it when `like` is a DTensor. Every replica
    has the whole `value` (from a checkpoint or a publish), so each takes its own shard and nothing is sent."""
    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def shard_optimizer_state(state_dict: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A full optimizer state dict (a checkpoint's, indexed by parameter as torch numbers them) with the state of
    each sharded parameter cut to this replica's shard: the tensors of the parameter's shape (AdamW's moments) are
    sharded like it, scalars (the step count) stay whole."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in state_dict["state"].items():
        param = params[index]
        state[index] = {key: shard_like(value, param) if isinstance(value, torch.Tensor) and value.shape == param.shape
                        and value.dim() > 0 else value for key, value in entry.items()}  # fmt: skip
    return {**state_dict, "state": state}
