"""Stable Diffusion as a policy: the UNet2DConditionModel behind classifier-free guidance, and its env.

Classifier-free guidance (Ho & Salimans 2022, eq. 6): eps = eps(x, t, uncond) + w (eps(x, t, c) - eps(x, t, uncond)).
The guided output is the policy's noise prediction, so DDPO's log-probabilities are those of the guided
sampler that made the trajectories (as in DDPO's SD experiments).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from rlft.envs.models import load_stable_diffusion
from rlft.envs.stable_diffusion import LatentDecoder, PromptContext, encode_prompts, read_prompts
from rlft.envs.tasks import make_env


class ClassifierFreeGuidance(nn.Module):
    """A conditional UNet called like one, returning the guided noise prediction. `config` is the UNet's."""

    def __init__(self, unet: nn.Module, negative_embedding: torch.Tensor, guidance_scale: float):
        super().__init__()
        self.unet = unet
        self.guidance_scale = float(guidance_scale)
        self.register_buffer("negative_embedding", negative_embedding, persistent=False)  # [1, L, D]

    @property
    def config(self):
        return self.unet.config

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        if self.guidance_scale == 1.0:  # w = 1 is the conditional model alone: one network call
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states)
        batch = sample.shape[0]
        negative = self.negative_embedding.to(encoder_hidden_states.dtype).expand(batch, -1, -1)
        eps = self.unet(
            torch.cat([sample, sample]), torch.cat([timestep, timestep]),
            encoder_hidden_states=torch.cat([negative, encoder_hidden_states]),
        ).sample  # fmt: skip
        eps_uncond, eps_cond = eps.chunk(2)
        return SimpleNamespace(sample=eps_uncond + self.guidance_scale * (eps_cond - eps_uncond))


def build_sd_policy(cfg: dict, reward, device: torch.device):
    """(guided UNet, env) for env.model_type=stable_diffusion; `reward` is a reward config or a built Reward."""
    env_cfg = cfg["env"]
    parts = load_stable_diffusion(env_cfg["base_model"])
    text_encoder = parts.text_encoder.to(device).eval()  # used here only: prompts are encoded once
    prompts = read_prompts(env_cfg["prompts"], env_cfg["prompt_file"])
    contexts = PromptContext(prompts, encode_prompts(text_encoder, parts.tokenizer, prompts, device))
    negative = encode_prompts(text_encoder, parts.tokenizer, [env_cfg["negative_prompt"]], device)  # [1, L, D]
    latent_size = env_cfg["resolution"] // 2 ** (len(parts.vae.config.block_out_channels) - 1)
    env = make_env(
        num_envs=cfg["trainer"]["rollout_batch_size"],
        sample_shape=(parts.unet.config.in_channels, latent_size, latent_size),
        scheduler_config=parts.scheduler_config,
        num_inference_steps=env_cfg["num_inference_steps"],
        eta=env_cfg["eta"],
        reward=reward,
        device=device,
        context_sampler=contexts,
        context_shape=contexts.shape,
        decoder=LatentDecoder(parts.vae.to(device)),
    )
    return ClassifierFreeGuidance(parts.unet.to(device), negative, env_cfg["guidance_scale"]), env
