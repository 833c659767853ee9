"""The SD3-class env on a tiny Stable Diffusion 3.5 folder: its ODE is diffusers' own StableDiffusion3Pipeline, the
rewards see the scaled and shifted VAE decoding, T5 may be left out, and the real layouts' errors name the fix."""

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusion3Pipeline

from rlft.config import compose, validate
from rlft.envs.models import ModelUnavailableError
from rlft.envs.rewards import jpeg_size_kb
from rlft.envs.stable_diffusion import pack_sd3_context, unpack_sd3_context
from rlft.rollout import RolloutWorker
from tests.tiny_models import save_tiny_sd3

SMALL = ["algo=grpo", "env=sd35_medium", "env.resolution=32", "env.max_sequence_length=8",
         "trainer.rollout_batch_size=4", "trainer.samples_per_epoch=4", "algo.minibatch_size=4", "algo.group_size=4",
         "eval.num_samples=4", "ray.rollout_threads=1", "ray.learner_threads=1", "ray.num_rollout_workers=1",
         "logging.wandb=disabled", "logging.progress=false",
         "reward=jpeg_compressibility", "judge=none"]  # fmt: skip  (the real reward and judge models are not here)


def sd3_worker(folder, *overrides: str) -> RolloutWorker:
    spec = compose([*SMALL, f"env.base_model={folder}", *overrides])
    validate(spec)
    return RolloutWorker(spec)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_the_ode_rollout_is_diffusers_stable_diffusion_3_pipeline(tiny_sd3, guidance_scale):
    """env.eta=0 steps the flow's Euler ODE: from the same initial latents and prompt, the policy's trajectory ends
    where diffusers' pipeline does (its own prompt encoding, guidance, transformer call and scheduler step)."""
    worker = sd3_worker(tiny_sd3, "algo=nft", "env.eta=0", "env.num_inference_steps=4",
                        f"env.guidance_scale={guidance_scale}",
                        "env.negative_prompt=a blurry photo")  # fmt: skip
    policy, prompts = worker.policy, worker.env.context_sampler.prompts
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    context = worker.env.context_sampler.embeddings[:2]  # the packed contexts of the first two prompts
    x = noise
    with torch.no_grad():
        for k in range(policy.schedule.num_steps):
            x = policy.step(x, k, context, noise=torch.zeros_like(x)).prev_sample
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    expected = pipeline(prompt=prompts[:2], negative_prompt="a blurry photo", num_inference_steps=4,
                        guidance_scale=guidance_scale, height=32, width=32, latents=noise.clone(),
                        max_sequence_length=8, output_type="latent").images  # fmt: skip
    torch.testing.assert_close(x, expected, atol=1e-4, rtol=1e-4)


def test_rollouts_score_the_scaled_and_shifted_vae_decoding(tiny_sd3):
    worker = sd3_worker(tiny_sd3, "env.num_inference_steps=3")
    batch = worker.collect(0, seed=2, n=4)
    assert batch["latents"].shape == (4, 4, 16, 16, 16)  # [B, T+1, 16 latent channels, 32 / 2, 32 / 2]
    table = worker.env.context_sampler.embeddings
    assert table.shape == (8, 16 + 8 + 1, 32)  # 16 CLIP tokens, 8 T5 tokens, the pooled row; joint_attention_dim
    assert all(any(torch.equal(row, t) for t in table) for row in batch["context"])
    assert batch["log_prob"][:, :2].isfinite().all() and (batch["log_prob"][:, :2] != 0).all()  # a stochastic SDE
    vae = AutoencoderKL.from_pretrained(tiny_sd3, subfolder="vae")
    with torch.no_grad():  # SD3's pipelines decode latents / scaling_factor + shift_factor
        images = vae.decode(batch["latents"][:, -1] / vae.config.scaling_factor + vae.config.shift_factor).sample
    torch.testing.assert_close(batch["reward"], -jpeg_size_kb(images, 95))


def test_contexts_pack_tokens_and_the_pooled_embedding_into_one_tensor():
    tokens, pooled = torch.randn(3, 5, 8), torch.randn(3, 6)
    packed = pack_sd3_context(tokens, pooled)
    assert packed.shape == (3, 6, 8) and (packed[:, -1, 6:] == 0).all()
    again = unpack_sd3_context(packed, 6)
    assert torch.equal(again[0], tokens) and torch.equal(again[1], pooled)
    with pytest.raises(ValueError, match="wider than the token embeddings"):
        pack_sd3_context(torch.randn(1, 2, 4), torch.randn(1, 6))


def test_without_t5_the_t5_tokens_are_zeros_as_in_diffusers(tmp_path):
    folder = save_tiny_sd3(tmp_path / "no_t5", with_t5=False)
    worker = sd3_worker(folder, "env.num_inference_steps=3")
    table = worker.env.context_sampler.embeddings
    assert table.shape == (8, 16 + 8 + 1, 32)
    assert (table[:, 16:24] == 0).all() and (table[:, :16] != 0).any()
    assert worker.collect(0, seed=0, n=4)["reward_finite"].all()


def test_broken_sd3_folders_are_named_with_the_fix(tiny_sd3, tmp_path):
    import shutil

    half = tmp_path / "half_t5"
    shutil.copytree(tiny_sd3, half)
    shutil.rmtree(half / "tokenizer_3")
    with pytest.raises(ModelUnavailableError, match="text_encoder_3/ and tokenizer_3/ come together"):
        validate(compose([*SMALL, f"env.base_model={half}"]))
    with pytest.raises(ModelUnavailableError, match="use env=sd35_medium"):
        validate(compose(["env=sd15", f"env.base_model={tiny_sd3}", "reward=jpeg_compressibility", "judge=none"]))
    with pytest.raises(ModelUnavailableError, match=r"transformer/config.json is missing"):
        validate(compose([*SMALL, f"env.base_model={tiny_sd3 / 'vae'}"]))
