"""LoRA adapters (peft) and gradient checkpointing on the policy's network, for every algorithm.

`configure_policy` is applied where the policy is built (`rlft.rollout.build_policy`), so learners and rollout
workers hold identical module trees and the keys of `trainable_state_dict` match: with `policy.lora_rank > 0`
those keys are the adapters' only (Hu et al. 2021, "LoRA", eq. 3: W x + (alpha / r) B A x, B initialised to 0,
so the adapted network starts as the base network). Adapters travel and are saved as safetensors; `merge_adapters`
folds them into the base weights for export as a plain diffusers model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rlft.policy import DiffusionPolicy, has_adapters
from rlft.spec import LORA_TARGETS, PolicySpec


def apply_lora(unet: nn.Module, rank: int, alpha: float, target_modules: list[str], dropout: float = 0.0) -> nn.Module:
    """Inject LoRA adapters into `unet` in place; afterwards only the adapters require gradients."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"policy.lora_rank={rank}: a LoRA rank must be at least 1 (0 means full fine-tuning)")
    names = {name for name, _ in unet.named_modules()}
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if not target_modules or missing:
        raise ValueError(
            f"policy.lora_target_modules={list(target_modules)}: {missing or 'empty'} match no module of "
            f"{type(unet).__name__}; name Linear/Conv2d layers by their last path components, e.g. "
            f"[{', '.join(LORA_TARGETS['unet'])}] for a diffusers UNet, [{', '.join(LORA_TARGETS['sd3'])}] for SD3"
        )
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
    unet.requires_grad_(False)
    unet = inject_adapter_in_model(config, unet)
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return unet


def configure_policy(policy: DiffusionPolicy, spec: PolicySpec, checkpointing_default: bool = False) -> DiffusionPolicy:
    """Apply the `policy:` config section: LoRA (rank 0 = full fine-tuning) and gradient checkpointing."""
    if spec.lora_rank:
        targets = spec.lora_target_modules or LORA_TARGETS["sd3" if policy.pooled_dim else "unet"]
        apply_lora(policy.unet, spec.lora_rank, spec.lora_alpha, targets, spec.lora_dropout)
    checkpointing = spec.gradient_checkpointing
    policy.gradient_checkpointing = checkpointing_default if checkpointing is None else bool(checkpointing)
    return policy


def scale_adapters(module: nn.Module, factor: float) -> None:
    """Multiply every LoRA adapter's update by `factor` (DRaFT sec. 4.3: sampling with a down-scaled LoRA
    interpolates between the base and the fine-tuned model), in place; the trained weights are unchanged."""
    from peft.tuners.lora import LoraLayer

    for layer in module.modules():
        if isinstance(layer, LoraLayer):
            for adapter in layer.scaling:
                layer.scaling[adapter] *= factor


def save_adapters(policy: DiffusionPolicy, path: str | Path) -> None:
    """The LoRA adapters (and nothing else) of `policy` as a safetensors file."""
    from safetensors.torch import save_file

    if not has_adapters(policy):
        raise ValueError("this policy has no LoRA adapters (policy.lora_rank=0); save its full weights instead")
    adapters = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items() if "lora_" in k}
    save_file(adapters, str(path))


def load_adapters(policy: DiffusionPolicy, path: str | Path) -> None:
    """Load adapters saved by `save_adapters` (or a run's final/policy.safetensors) into a policy built alike."""
    from safetensors.torch import load_file

    weights = load_file(str(path))
    expected = {k for k in policy.state_dict() if "lora_" in k}
    if set(weights) != expected:
        raise KeyError(
            f"{path} holds {len(weights)} tensors but this policy has {len(expected)} LoRA tensors "
            f"(e.g. unexpected {sorted(set(weights) - expected)[:3]}, missing {sorted(expected - set(weights))[:3]}); "
            "build the policy with the same policy.lora_rank and policy.lora_target_modules as the run that saved it"
        )
    policy.load_trainable_state_dict(weights)


@torch.no_grad()
def merge_adapters(unet: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer (W + alpha/r B A) and remove the adapter modules, in place.

    The result has the base model's module tree and state-dict keys, so `unet.save_pretrained(folder)` exports
    a plain diffusers model that `env.base_model=folder` loads.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, module.get_base_layer())
    unet.requires_grad_(True)
    return unet
