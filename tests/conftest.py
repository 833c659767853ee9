import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402  (importing torch does not import triton; tensordict and diffusers do)

if not torch.cuda.is_available():
    # rlft's Triton kernels (rlft/group_norm_silu.py) then run on CPU through Triton's interpreter, which has to be
    # chosen before triton is first imported; inductor's CPU code generation does not use triton
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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_ddpm(tmp_path_factory.mktemp("tiny_ddpm"))


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
