"""The Stable Diffusion task's env side: prompts as context (CLIP text embeddings) and the VAE decoder.

The MDP runs in latent space (x_t: [4, H/8, W/8]); the context of a trajectory is the text encoder's last
hidden state for a prompt drawn uniformly from the prompt list ([77, D]); the reward sees the VAE decoding
of x_0, in [-1, 1] (DDPO sec. 5: rewards score decoded images).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def read_prompts(prompts: list[str] | None, prompt_file: str | None) -> list[str]:
    """The prompt list: one prompt per non-empty line of `prompt_file` when given, else `prompts`."""
    if prompt_file:
        path = Path(prompt_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"env.prompt_file={prompt_file} does not exist; give a text file, a prompt a line")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("the Stable Diffusion env needs prompts: env.prompts=[...] or env.prompt_file=/path.txt")
    return list(prompts)


@torch.no_grad()
def encode_prompts(text_encoder: nn.Module, tokenizer, prompts: list[str], device) -> torch.Tensor:
    """[P, L, D] last hidden states of the CLIP text encoder, padded to the tokenizer's max length (77 in SD)."""
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return text_encoder(tokens.input_ids.to(device))[0].float()


class PromptContext:
    """Context sampler: each trajectory's context is the embedding of a prompt drawn uniformly at random."""

    def __init__(self, prompts: list[str], embeddings: torch.Tensor):
        self.prompts = prompts
        self.embeddings = embeddings  # [P, L, D]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.embeddings.shape[1:])

    def __call__(self, n: int, generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(len(self.prompts), (n,), generator=generator)
        return self.embeddings[index.to(self.embeddings.device)]  # [n, L, D]


class LatentDecoder(nn.Module):
    """SD latents -> images in [-1, 1]: `vae.decode(latents / scaling_factor)`; differentiable (DRaFT)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(scaled).sample.float()
