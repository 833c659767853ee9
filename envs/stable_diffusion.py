"""The Stable Diffusion tasks' env side: prompts as context (text embeddings) and the VAE decoder.

The MDP runs in latent space (x_t: [4, H/8, W/8] for SD 1.5, [16, H/8, W/8] for SD3); the context of a trajectory is
the text embedding of a prompt drawn uniformly from the prompt list; the reward sees the VAE decoding of x_0, in
[-1, 1] (DDPO sec. 5: rewards score decoded images), and the prompt itself (prompts=[...]). The negative prompt's
embedding is the env's null context, which classifier-free guidance pairs with every prompt.

    SD 1.5   context [77, D]: the CLIP text encoder's last hidden state
    SD3      context [L + 1, D]: diffusers' StableDiffusion3Pipeline.encode_prompt's token embeddings (CLIP-L and
             CLIP-G tokens, then T5's; L = 77 + max_sequence_length) with its pooled embedding ([P], P <= D) as
             one more row, zero-padded to D (`pack_sd3_context`): one tensor per trajectory, as every other env's
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from rlft.envs.denoising import DenoisingEnv
from rlft.envs.rewards import Reward

if TYPE_CHECKING:
    from rlft.envs.tasks import StableDiffusionEnvConfig


def read_prompts(prompts: list[str] | None, prompt_file: str | None, key: str = "env.prompts") -> list[str]:
    """The prompt list: one prompt per non-empty line of `prompt_file` when given, else `prompts`."""
    if prompt_file:
        path = Path(prompt_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{key.replace('prompts', 'prompt_file')}={prompt_file} does not exist; give a "
                                    "text file, a prompt a line")  # fmt: skip
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"the Stable Diffusion env needs prompts: {key}=[...] or a prompt file")
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

    def prompts_of(self, context: torch.Tensor) -> list[str]:
        """The prompt of each context row [B, L, D] (an exact match in the table: contexts are its rows)."""
        table = self.embeddings.to(context.device).flatten(1)
        distances = torch.cdist(context.detach().flatten(1).float(), table, compute_mode="donot_use_mm_for_euclid_dist")
        best, index = distances.min(dim=1)
        if bool((best > 1e-4 * table.norm(dim=1).max()).any()):
            raise ValueError("a context is not the embedding of one of this env's prompts")
        return [self.prompts[i] for i in index.tolist()]

    def reward_context(self, context: torch.Tensor) -> dict:
        return {"prompts": self.prompts_of(context)}


class LatentDecoder(nn.Module):
    """SD latents -> images in [-1, 1]: `vae.decode(latents / scaling_factor)`; differentiable (DRaFT, AM)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None)  # SD3's VAE latents are shifted too
        return self.vae.decode(scaled if shift is None else scaled + shift).sample.float()


@functools.lru_cache(maxsize=2)
def load_env_parts(base_model: str, revision: str | None, device: str) -> tuple[nn.Module, object, nn.Module]:
    """(text encoder, tokenizer, VAE) of a Stable Diffusion folder, loaded once per process and device: the training
    and the evaluation env share them."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from rlft.envs.models import load_sd_part

    text_encoder = load_sd_part(CLIPTextModel, base_model, "text_encoder", revision).to(device).eval()
    tokenizer = load_sd_part(CLIPTokenizer, base_model, "tokenizer", revision)
    vae = load_sd_part(AutoencoderKL, base_model, "vae", revision).to(device)
    return text_encoder.requires_grad_(False), tokenizer, vae


def make_stable_diffusion_env(cfg: StableDiffusionEnvConfig, reward: Reward, num_envs: int, device: str | torch.device,
                              evaluation: bool = False) -> DenoisingEnv:  # fmt: skip
    """The latent MDP of `cfg`: training prompts, or the held-out evaluation prompts with `evaluation`."""
    text_encoder, tokenizer, vae = load_env_parts(cfg.base_model, cfg.revision, str(device))
    return prompted_env(cfg, reward, num_envs, device, evaluation, vae,
                        lambda prompts: encode_prompts(text_encoder, tokenizer, prompts, device))  # fmt: skip


def prompted_env(cfg: StableDiffusionEnvConfig, reward: Reward, num_envs: int, device: str | torch.device,
                 evaluation: bool, vae: nn.Module, encode) -> DenoisingEnv:  # fmt: skip
    """A text-to-image latent MDP: the prompts of `cfg` (or its evaluation prompts), each trajectory's context
    a row of `encode(prompts)`, the negative prompt's encoding as the null context, and the VAE decoding x_0."""
    if evaluation:
        prompts = read_prompts(cfg.eval_prompts, cfg.eval_prompt_file, "env.eval_prompts")
    else:
        prompts = read_prompts(cfg.prompts, cfg.prompt_file)
    contexts = PromptContext(prompts, encode(prompts))
    null_context = encode([cfg.negative_prompt])  # [1, *ctx]
    return DenoisingEnv(num_envs=num_envs, sample_shape=cfg.sample_shape(), schedule=cfg.schedule(), reward=reward,
                        context_sampler=contexts, context_shape=contexts.shape, device=device,
                        decoder=LatentDecoder(vae), reward_context=contexts.reward_context,
                        null_context=null_context)  # fmt: skip


# ---------------------------------------------------------------- Stable Diffusion 3 / 3.5


def pack_sd3_context(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """[B, L + 1, D]: the token embeddings [B, L, D] with the pooled embedding [B, P] (P <= D) as a last, zero-padded
    row."""
    if pooled.shape[-1] > tokens.shape[-1]:
        raise ValueError(f"the pooled text embedding ({pooled.shape[-1]}) is wider than the token embeddings "
                         f"({tokens.shape[-1]}): not an SD3 layout (2048 <= 4096)")  # fmt: skip
    row = torch.nn.functional.pad(pooled, (0, tokens.shape[-1] - pooled.shape[-1]))
    return torch.cat([tokens, row.unsqueeze(1)], dim=1)


def unpack_sd3_context(context: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, L, D], pooled [B, P]) of a packed context: what SD3Transformer2DModel takes."""
    return context[:, :-1], context[:, -1, :pooled_dim]


@functools.lru_cache(maxsize=2)
def load_sd3_env_parts(base_model: str, revision: str | None, device: str):
    """(diffusers' StableDiffusion3Pipeline holding the text encoders and tokenizers only, VAE), loaded once per
    process and device. The transformer stays out (the policy owns it); encode_prompt reads only its config."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from rlft.envs.models import load_sd_config, load_sd_part, sd3_has_t5

    def part(cls, subfolder):
        return load_sd_part(cls, base_model, subfolder, revision)

    encoders = {name: part(CLIPTextModelWithProjection, name).to(device).eval().requires_grad_(False)
                for name in ("text_encoder", "text_encoder_2")}  # fmt: skip
    tokenizers = {name: part(CLIPTokenizer, name) for name in ("tokenizer", "tokenizer_2")}
    if sd3_has_t5(base_model, revision):
        encoders["text_encoder_3"] = part(T5EncoderModel, "text_encoder_3").to(device).eval().requires_grad_(False)
        tokenizers["tokenizer_3"] = part(T5TokenizerFast, "tokenizer_3")
    else:
        encoders["text_encoder_3"], tokenizers["tokenizer_3"] = None, None
    pipeline = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, **encoders, **tokenizers)
    # without T5, encode_prompt fills its tokens with zeros of the transformer's joint_attention_dim
    transformer_config = load_sd_config(base_model, "transformer", revision, what="Stable Diffusion 3")
    pipeline.transformer = SimpleNamespace(config=SimpleNamespace(**transformer_config))
    vae = part(AutoencoderKL, "vae").to(device)
    return pipeline, vae


@torch.no_grad()
def encode_sd3_prompts(pipeline, prompts: list[str], max_sequence_length: int, device) -> torch.Tensor:
    """[P, L + 1, D] packed contexts of `prompts` (diffusers' encode_prompt, unguided: one embedding per prompt)."""
    tokens, _, pooled, _ = pipeline.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)  # fmt: skip
    return pack_sd3_context(tokens.float(), pooled.float())


def make_sd3_env(cfg: StableDiffusionEnvConfig, reward: Reward, num_envs: int, device: str | torch.device,
                 evaluation: bool = False) -> DenoisingEnv:  # fmt: skip
    """The latent flow MDP of an SD3 config: training prompts, or the held-out evaluation prompts with `evaluation`."""
    pipeline, vae = load_sd3_env_parts(cfg.base_model, cfg.revision, str(device))
    return prompted_env(cfg, reward, num_envs, device, evaluation, vae,
                        lambda prompts: encode_sd3_prompts(pipeline, prompts, cfg.max_sequence_length, device))
