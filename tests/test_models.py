"""Real base models through their real loaders, on tiny random models saved with save_pretrained; offline errors."""

import huggingface_hub.constants
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel
from rlft.envs.models import ModelUnavailableError, check_base_model
from rlft.envs.rewards import jpeg_size_kb
from transformers import CLIPTextModel

from rlft.config import compose, to_container, validate
from rlft.rollout import RolloutWorker
from rlft.stable_diffusion import ClassifierFreeGuidance
from tests.conftest import save_tiny_ddpm
from tests.tiny_models import save_tiny_stable_diffusion

SMALL = ["env.num_inference_steps=3", "trainer.rollout_batch_size=4", "trainer.samples_per_epoch=4",
         "algo.minibatch_size=4", "eval.num_samples=4", "ray.rollout_threads=1", "ray.learner_threads=1",
         "ray.num_rollout_workers=1", "logging.wandb=disabled", "logging.progress=false",
         "reward=jpeg_compressibility"]  # fmt: skip


def cfg_for(*overrides: str) -> dict:
    cfg = compose("config", [*SMALL, *overrides])
    validate(cfg)
    return to_container(cfg)


@pytest.fixture(scope="module")
def tiny_rgb_ddpm(tmp_path_factory):
    return save_tiny_ddpm(tmp_path_factory.mktemp("rgb_ddpm"), seed=3, sample_size=16, channels=3)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """No network (conftest sets HF_HUB_OFFLINE=1) and an empty HF cache: the real models are not to be had."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))


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
        assert compose("config", [f"env={env}"]).env.base_model == model_id


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
        check_base_model({"name": "ddpm", "base_model": str(tmp_path)})  # fmt: skip
    with pytest.raises(ValueError, match="env=ddpm needs a base model: set env.base_model="):
        validate(compose("config", ["env=ddpm"]))


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
    evaluated = worker.evaluate(0, seed=2, n=4)
    torch.testing.assert_close(evaluated["images"], images, atol=1e-5, rtol=0)


def test_classifier_free_guidance_combines_the_two_predictions(tiny_sd):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 16, 16, generator=generator), torch.tensor([900, 500, 20])
    cond = text_encoder(torch.randint(2, 50, (3, 16), generator=generator))[0]
    uncond = text_encoder(torch.ones(1, 16, dtype=torch.int64))[0]
    with torch.no_grad():
        eps_c = unet(x, t, encoder_hidden_states=cond).sample
        eps_u = unet(x, t, encoder_hidden_states=uncond.expand(3, -1, -1)).sample
        guided = ClassifierFreeGuidance(unet, uncond, 7.5)(x, t, encoder_hidden_states=cond).sample
        plain = ClassifierFreeGuidance(unet, uncond, 1.0)(x, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(guided, eps_u + 7.5 * (eps_c - eps_u), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain, eps_c)


def test_prompts_come_from_a_prompt_file(tiny_sd, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a cat\n\nan owl at night\n")
    cfg = cfg_for("env=sd15", f"env.base_model={tiny_sd}", "env.resolution=32", f"env.prompt_file={prompt_file}")
    worker = RolloutWorker(cfg)
    assert worker.env.context_sampler.prompts == ["a cat", "an owl at night"]
    with pytest.raises(FileNotFoundError, match="env.prompt_file=/nonexistent.txt does not exist"):
        RolloutWorker({**cfg, "env": {**cfg["env"], "prompt_file": "/nonexistent.txt"}})


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
    assert gymnasium.spec("rlft/CelebAHQ-v0").kwargs["base_model"] == "google/ddpm-celebahq-256"
