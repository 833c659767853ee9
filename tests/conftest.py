import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402  (importing torch does not import triton; tensordict and diffusers do)

if not torch.cuda.is_available():
    # rlft's Triton kernels (rlft/kernels/group_norm_silu.py) then run on CPU through Triton's interpreter, which has
    # to be chosen before triton is first imported; inductor's CPU code generation does not use triton
    os.environ.setdefault("TRITON_INTERPRET", "1")


def save_tiny_ddpm(path, seed: int = 0, sample_size: int = 16, channels: int = 1):
    """A randomly initialised UNet2DModel + DDPMScheduler in the save_pretrained layout of google/ddpm-*."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    unet.save_pretrained(path, safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False).save_pretrained(path)
    return path


def save_tiny_flow(path, seed: int = 0, sample_size: int = 16, channels: int = 1, shift: float = 1.0):
    """A randomly initialised velocity UNet2DModel + FlowMatchEulerDiscreteScheduler in rlft.pretrain's digits_flow
    layout (config.json, diffusion_pytorch_model.safetensors, scheduler_config.json)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    save_tiny_ddpm(path, seed, sample_size, channels)
    (path / "scheduler_config.json").unlink()
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_flow_dir(tmp_path_factory):
    return save_tiny_flow(tmp_path_factory.mktemp("tiny_flow"))


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny models and many small steps run faster than on two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_ddpm(tmp_path_factory.mktemp("tiny_ddpm"))


@pytest.fixture(scope="session")
def tiny_rgb_ddpm(tmp_path_factory):
    """A 3-channel 16 px UNet2DModel in the google/ddpm-* layout: what the celebahq, church and cifar10 envs load."""
    return save_tiny_ddpm(tmp_path_factory.mktemp("rgb_ddpm"), seed=3, sample_size=16, channels=3)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny Stable Diffusion pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    from tests.tiny_models import save_tiny_stable_diffusion

    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """A tiny Stable Diffusion 3.5 folder (transformer/, vae/, three text encoders and tokenizers, scheduler/)."""
    from tests.tiny_models import save_tiny_sd3

    return save_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """No model is in the HF cache (and HF_HUB_OFFLINE=1, set above): every Hub id is unavailable."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_rgb_ddpm, tiny_sd, tiny_sd3, tiny_flow_dir) -> dict:
    """Every model and data set the matrix needs, tiny, in the real layouts."""
    from safetensors.torch import save_file

    from tests.tiny_models import (
        save_tiny_age_classifier,
        save_tiny_clip,
        save_tiny_clip_with_tokenizer,
        save_tiny_flowers102,
        save_tiny_image_reward,
        save_tiny_pickscore,
    )

    root = tmp_path_factory.mktemp("matrix_models")
    clip = save_tiny_clip(root / "clip", image_size=24, projection_dim=16)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1)
    save_file({"weight": head.weight.data.clone(), "bias": head.bias.data.clone()}, str(root / "head.safetensors"))
    pickscore_model, pickscore_processor = save_tiny_pickscore(root / "pickscore")
    image_reward = save_tiny_image_reward(root / "image_reward")
    return {
        "rgb_ddpm": tiny_rgb_ddpm, "sd": tiny_sd, "sd3": tiny_sd3, "flow": tiny_flow_dir,
        "clip": clip, "head": root / "head.safetensors",
        "clip_with_tokenizer": save_tiny_clip_with_tokenizer(root / "clip_tokenizer"),
        "age": save_tiny_age_classifier(root / "age"),
        "pickscore_model": pickscore_model, "pickscore_processor": pickscore_processor,
        "image_reward": image_reward["checkpoint"], "image_reward_tokenizer": image_reward["tokenizer"],
        "flowers": save_tiny_flowers102(root / "flowers"),
    }  # fmt: skip


_exit_status = {}


def pytest_sessionfinish(session, exitstatus):
    _exit_status["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with pytest's own exit status once everything is reported, without the interpreter's finalisation: the
    native threads that Ray, gloo and wandb leave in this process can crash it after every test has passed (seen once
    in a full run: `164 passed`, then exit 139, a segfault in a non-main thread executing freed memory)."""
    if "code" in _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status["code"])
