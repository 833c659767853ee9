"""Real base models through their real loaders, on tiny random models saved with save_pretrained; offline errors."""

import dataclasses
import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel
from transformers import CLIPTextModel

from rlft.config import compose, validate
from rlft.core.schedule import DDIMSchedule
from rlft.envs.models import ModelUnavailableError, check_ddpm
from rlft.envs.rewards import jpeg_size_kb
from rlft.policy import DiffusionPolicy
from rlft.rollout import RolloutWorker

SMALL = ["env.num_inference_steps=3", "trainer.rollout_batch_size=4", "trainer.samples_per_epoch=4",
         "algo.minibatch_size=4", "eval.num_samples=4", "ray.rollout_threads=1", "ray.learner_threads=1",
         "ray.num_rollout_workers=1", "logging.wandb=disabled", "logging.progress=false",
         "reward=jpeg_compressibility", "judge=none"]  # fmt: skip  (the real reward and judge models are not here)


def cfg_for(*overrides: str):
    spec = compose([*SMALL, *overrides])
    validate(spec)
    return spec


@pytest.mark.parametrize("env", ["celebahq", "church", "cifar10"])
def test_ddpm_envs_load_their_model_and_roll_out(env, tiny_rgb_ddpm):
    cfg = cfg_for(f"env={env}", f"env.base_model={tiny_rgb_ddpm}")
    worker = RolloutWorker(cfg)
    saved = UNet2DModel.from_pretrained(tiny_rgb_ddpm)
    for name, value in saved.state_dict().items():  # the policy holds exactly the saved weights
        assert torch.equal(worker.policy.unet.state_dict()[name], value), name
    batch = worker.collect(0, seed=1, n=4)
    assert batch["latents"].shape == (4, 4, 3, 16, 16)
    assert batch["reward_finite"].all()
    torch.testing.assert_close(batch["reward"], -jpeg_size_kb(batch["latents"][:, -1], 95))


def test_hub_ids_of_the_real_models_are_the_defaults():
    expected = {"celebahq": "google/ddpm-celebahq-256", "church": "google/ddpm-church-256",
                "cifar10": "google/ddpm-cifar10-32", "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    for env, model_id in expected.items():
        assert compose([f"env={env}"]).env.base_model == model_id


@pytest.mark.parametrize(
    "overrides, model_id, key",
    [(["env=celebahq"], "google/ddpm-celebahq-256", "env.base_model"),
     (["env=sd15"], "stable-diffusion-v1-5/stable-diffusion-v1-5", "env.base_model"),
     (["reward=over50"], "nateraw/vit-age-classifier", "reward.classifier")],
)  # fmt: skip
def test_missing_models_stop_the_run_before_ray_with_the_fix(overrides, model_id, key, empty_hf_cache, tmp_path):
    import ray

    from rlft.run import main

    with pytest.raises(SystemExit) as stopped:
        main([*overrides, f"logging.run_dir={tmp_path / 'run'}", "logging.wandb=disabled"])
    message = str(stopped.value)
    assert f"'{model_id}'" in message and f"{key}=/path/to/folder" in message
    assert "HF_HUB_OFFLINE" in message and f"hf download {model_id}" in message
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


def test_a_folder_without_the_model_files_is_named(tmp_path):
    with pytest.raises(ModelUnavailableError, match=r"scheduler_config.json is missing.*env.base_model="):
        UNet2DModel(sample_size=8, block_out_channels=(4, 8), norm_num_groups=4, layers_per_block=1,
                    down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(tmp_path)
        check_ddpm(str(tmp_path))  # fmt: skip
    with pytest.raises(ValueError, match="env=ddpm needs a base model: set env.base_model="):
        validate(compose(["env=ddpm"]))


def test_stable_diffusion_env_rolls_out_in_latent_space_and_rewards_decoded_images(tiny_sd):
    cfg = cfg_for("env=sd15", f"env.base_model={tiny_sd}", "env.resolution=32", "env.guidance_scale=3.0",
                  "policy.channels_last=true")  # the fast-path options apply to the guided UNet too
    worker = RolloutWorker(cfg)
    batch = worker.collect(0, seed=2, n=4)
    assert batch["latents"].shape == (4, 4, 4, 16, 16)  # [B, T+1, latent channels, 32 / 2, 32 / 2]
    # each context is the text encoder's embedding of one of the prompts
    tokenizer = worker.env.context_sampler
    prompts, table = tokenizer.prompts, tokenizer.embeddings
    assert len(prompts) == 8 and table.shape == (8, 16, 12)
    assert all(any(torch.equal(row, t) for t in table) for row in batch["context"])
    # the reward scores the VAE decoding of x_0
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    with torch.no_grad():
        images = vae.decode(batch["latents"][:, -1] / vae.config.scaling_factor).sample
    assert images.shape == (4, 3, 32, 32)
    torch.testing.assert_close(batch["reward"], -jpeg_size_kb(images, 95))
    # evaluations sample the held-out prompts (the evaluation env) and show the VAE decoding of their x_0
    evaluated = worker.evaluate(0, seed=2, n=4)
    held_out = worker.eval_env.context_sampler
    assert held_out.prompts == ["a photo of a fox", "a photo of a cow", "a photo of an owl", "a photo of a goat"]
    assert all(any(torch.equal(row, t) for t in held_out.embeddings) for row in evaluated["context"])
    eval_batch = worker.collect(0, seed=2, n=4, postprocess=False, env=worker.eval_env)
    with torch.no_grad():
        eval_images = vae.decode(eval_batch["latents"][:, -1] / vae.config.scaling_factor).sample
    torch.testing.assert_close(evaluated["images"], eval_images, atol=1e-5, rtol=0)


def test_classifier_free_guidance_combines_the_two_predictions(tiny_sd):
    """The policy's guided prediction (DiffusionPolicy with the env's null context; the old ClassifierFreeGuidance
    wrapper is gone) against the two predictions of the real UNet."""
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    scheduler_config = json.loads((tiny_sd / "scheduler" / "scheduler_config.json").read_text())
    schedule = DDIMSchedule.from_scheduler_config(scheduler_config, 4, 1.0)
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 16, 16, generator=generator), torch.tensor([900, 500, 20])
    cond = text_encoder(torch.randint(2, 50, (3, 16), generator=generator))[0]
    uncond = text_encoder(torch.ones(1, 16, dtype=torch.int64))[0]
    with torch.no_grad():
        eps_c = unet(x, t, encoder_hidden_states=cond).sample
        eps_u = unet(x, t, encoder_hidden_states=uncond.expand(3, -1, -1)).sample
        guided = DiffusionPolicy(unet, schedule, null_context=uncond, guidance_scale=7.5)(x, t, cond)
        plain = DiffusionPolicy(unet, schedule, null_context=uncond, guidance_scale=1.0)(x, t, cond)
        # a call's own guidance scale wins over the policy's
        overridden = DiffusionPolicy(unet, schedule, null_context=uncond, guidance_scale=1.0)(x, t, cond,
                                                                                              guidance_scale=7.5)
    torch.testing.assert_close(guided, eps_u + 7.5 * (eps_c - eps_u), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(overridden, guided)
    torch.testing.assert_close(plain, eps_c)


def test_prompts_come_from_a_prompt_file(tiny_sd, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a cat\n\nan owl at night\n")
    cfg = cfg_for("env=sd15", f"env.base_model={tiny_sd}", "env.resolution=32", f"env.prompt_file={prompt_file}")
    worker = RolloutWorker(cfg)
    assert worker.env.context_sampler.prompts == ["a cat", "an owl at night"]
    with pytest.raises(FileNotFoundError, match="env.prompt_file=/nonexistent.txt does not exist"):
        RolloutWorker(dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, prompt_file="/nonexistent.txt")))


def test_ddpo_trains_the_stable_diffusion_unet_through_guidance(tiny_sd, tmp_path):
    from rlft.learner import Learner

    cfg = cfg_for("env=sd15", f"env.base_model={tiny_sd}", "env.resolution=32", "env.guidance_scale=4.0",
                  "algo.lr=1e-3")  # fmt: skip
    worker, learner = RolloutWorker(cfg), Learner(cfg, torch.device("cpu"))
    assert not any("negative_embedding" in k for k in learner.policy.trainable_state_dict())
    before = {k: v.clone() for k, v in learner.policy.trainable_state_dict().items()}
    learner.ingest([("b0", worker.collect(0, seed=0, n=4))])
    metrics = learner.update()
    assert metrics["ddpo/clip_fraction"] >= 0 and torch.isfinite(torch.tensor(metrics["loss/policy"]))
    after = learner.policy.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the guided UNet's weights moved
    worker.set_weights(after, 1)  # and the rollout worker takes them


def test_registered_gymnasium_ids_build_the_env_from_the_model_configs(tiny_rgb_ddpm):
    import gymnasium

    env = gymnasium.make_vec("rlft/CIFAR10-v0", 2, vectorization_mode="vector_entry_point",
                             base_model=str(tiny_rgb_ddpm), num_inference_steps=4)  # fmt: skip
    obs, _ = env.reset(seed=0)
    assert obs["x_t"].shape == (2, 3, 16, 16) and env.schedule.num_steps == 4
    # the registered id builds its preset, whose default base model is the real one (kwargs change preset keys)
    from rlft.envs.tasks import ENV_PRESETS

    celebahq = gymnasium.spec("rlft/CelebAHQ-v0").kwargs["preset_name"]
    assert ENV_PRESETS[celebahq].base_model == "google/ddpm-celebahq-256"
