"""Env configs, one dataclass per env kind, the named presets (`env=<preset>`), and the envs they build.

    kind              the MDP                                         context              rewards see
    ddpm              an unconditional pixel-space DDPM (UNet2DModel)  none                 x_0
    flow              an unconditional pixel-space flow-matching model none                 x_0
    inverse           a pixel DDPM and a measurement y = A(x) + noise  y                    x_0 (and y, A, sigma_y)
    stable_diffusion  latent text-to-image (UNet2DConditionModel)      prompt embeddings    the VAE's decoding of x_0
    sd3               latent text-to-image flow (SD3Transformer2DModel) prompt embeddings    the VAE's decoding of x_0

A config knows where its base model lives: `image_spec` reads the model's configs (never its weights) to tell what
the reward will see, `check` finds missing models before Ray starts, `make_env` builds the batched env and
`load_network` the base network a policy wraps (the env never owns it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rlft.core.flow import FlowSchedule
from rlft.core.schedule import DDIMSchedule
from rlft.core.spec import knob
from rlft.envs.denoising import DenoisingEnv, SingleDenoisingEnv
from rlft.envs.rewards import ImageSpec, Reward

BUILTIN_DIGITS = "builtin:digits"


@dataclass
class EnvConfig:
    """The keys every env has."""

    KIND: ClassVar[str] = ""
    FLOW: ClassVar[bool] = False  # a velocity model on the rectified-flow path (its schedule is a FlowSchedule)
    LATENT: ClassVar[bool] = False  # the MDP runs in a VAE's latent space (rewards see the decoding)
    name: str = knob("", "task name (the env=<preset> it came from)")
    kind: str = knob("", "the env kind, fixed by the preset: ddpm, flow, inverse, stable_diffusion or sd3")
    base_model: str | None = knob(None, "Hub id, or a folder saved with save_pretrained (builtin:digits: shipped)")
    revision: str | None = knob(None, "Hub revision (branch, tag or commit) that base_model is pinned to")
    num_inference_steps: int = knob(20, "DDIM steps per trajectory (the MDP horizon)", ge=1)
    eta: float = knob(1.0, "DDIM stochasticity: 1 = memoryless (DDPM posterior variance), 0 = deterministic",
                      ge=0, le=1)  # fmt: skip
    default_reward: str = knob("jpeg_compressibility", "the reward chosen with this env unless reward=... is given")
    default_judge: str = knob("none", "the evaluation judge chosen with this env unless judge=... is given: a scorer "
                              "the update never sees (none: the env's own metrics only)")  # fmt: skip

    def __post_init__(self) -> None:
        self.kind = self.kind or self.KIND

    def problems(self) -> list[str]:
        problems = []
        if self.kind != self.KIND:
            problems.append(f"env.kind={self.kind} does not match env={self.name} (a {self.KIND} env); the kind is "
                            "fixed by the preset: choose another env instead")  # fmt: skip
        if not self.base_model:
            problems.append(f"env={self.name} needs a base model: set env.base_model=<Hub id or folder>")
        return problems

    def check(self) -> None:
        """Raise (with the fix) when the base model's files cannot be found; reads configs only."""
        from rlft.envs.models import check_ddpm

        check_ddpm(self.base_model, self.revision)
        self.schedule()  # a scheduler of the other family (a flow model under env=ddpm, ...) is refused here

    def image_spec(self) -> ImageSpec:
        channels, size = self.sample_shape()[:2]
        return ImageSpec(channels, size, size)

    def sample_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of x_t, from the base model's config."""
        from rlft.envs.models import load_ddpm_configs

        unet_config, _ = load_ddpm_configs(self.base_model, self.revision)
        return (unet_config["in_channels"], unet_config["sample_size"], unet_config["sample_size"])

    def scheduler_config(self) -> dict:
        from rlft.envs.models import load_ddpm_configs

        return load_ddpm_configs(self.base_model, self.revision)[1]

    def network_config(self) -> dict:
        """The base network's config (its architecture), without its weights."""
        from rlft.envs.models import load_ddpm_configs

        return load_ddpm_configs(self.base_model, self.revision)[0]

    def schedule(self) -> DDIMSchedule:
        return DDIMSchedule.from_scheduler_config(self.scheduler_config(), self.num_inference_steps, self.eta)

    def load_network(self) -> torch.nn.Module:
        """The base network (weights included) that a policy wraps."""
        from rlft.envs.models import load_ddpm

        return load_ddpm(self.base_model, revision=self.revision)[0]

    def make_env(self, reward: Reward, num_envs: int, device: str | torch.device = "cpu",
                 evaluation: bool = False) -> DenoisingEnv:  # fmt: skip
        """The batched env; `evaluation` gives the env evaluations run in (fixed held-out cases, prompts)."""
        return DenoisingEnv(num_envs, self.sample_shape(), self.schedule(), reward, device=device)


@dataclass
class DDPMEnvConfig(EnvConfig):
    """An unconditional pixel-space DDPM: a diffusers UNet2DModel + DDPMScheduler (google/ddpm-*, rlft.pretrain)."""

    KIND: ClassVar[str] = "ddpm"


@dataclass
class FlowEnvConfig(EnvConfig):
    """An unconditional pixel-space flow-matching model: a velocity-predicting diffusers UNet2DModel with a
    FlowMatchEulerDiscreteScheduler (rlft.pretrain's digits_flow). The MDP steps the rectified flow's sampler
    (rlft.core.flow): eta = 0 its ODE, eta = 1 the memoryless SDE, between them Flow-GRPO's SDE (a = eta sqrt(2))."""

    KIND: ClassVar[str] = "flow"
    FLOW: ClassVar[bool] = True
    num_inference_steps: int = knob(10, "sampler steps per trajectory on the scheduler's time grid (the horizon)",
                                    ge=1)  # fmt: skip
    eta: float = knob(1.0, "SDE noise as a fraction of the memoryless one (a = eta sqrt(2)): 1 = memoryless, "
                      "0.5 = Flow-GRPO's a = 0.7, 0 = the deterministic ODE", ge=0, le=1)  # fmt: skip

    def scheduler_config(self) -> dict:
        from rlft.envs.models import load_ddpm_configs

        return load_ddpm_configs(self.base_model, self.revision, what="base flow model")[1]

    def network_config(self) -> dict:
        from rlft.envs.models import load_ddpm_configs

        return load_ddpm_configs(self.base_model, self.revision, what="base flow model")[0]

    def schedule(self) -> FlowSchedule:
        return FlowSchedule.from_scheduler_config(self.scheduler_config(), self.num_inference_steps, self.eta)

    def load_network(self) -> torch.nn.Module:
        from rlft.envs.models import load_flow_unet

        return load_flow_unet(self.base_model, self.revision)


@dataclass
class InverseEnvConfig(DDPMEnvConfig):
    """An inverse problem (envs/inverse.py): recover x from y = A(x) + sigma_y noise; y is the context."""

    KIND: ClassVar[str] = "inverse"
    default_reward: str = knob("measurement", "the reward chosen with this env unless reward=... is given")
    dataset: str = knob("digits", "ground truths: the train split for training, the held-out split for evaluation",
                        choices=("digits", "flowers102"))  # fmt: skip
    data_root: str | None = knob(None, "flowers102: the folder holding flowers-102/ (torchvision's layout)")
    image_size: int = knob(64, "flowers102: images are resized and centre-cropped to this side", ge=1)
    operator: str = knob("sr", "forward operator A: sr (average pooling by scale) or inpaint (hide the centre)",
                         choices=("sr", "inpaint"))  # fmt: skip
    scale: int = knob(4, "super-resolution factor (sr only)", ge=1)
    hole_fraction: float = knob(0.5, "side of the hidden central square as a fraction of the side (inpaint)",
                                gt=0, lt=1)  # fmt: skip
    sigma_y: float = knob(0.05, "standard deviation of the Gaussian measurement noise (images live in [-1, 1])", gt=0)
    noise_seed: int = knob(0, "seed of the fixed measurement noise of each split's cases", ge=0)
    samples_per_case: int = knob(1, "training batches hold this many samples of each measurement", ge=1)

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.dataset == "flowers102":
            from rlft.envs.flowers import flowers102_problems

            problems += flowers102_problems(self.data_root)
        return problems

    def image_spec(self) -> ImageSpec:
        channels, size = self.sample_shape()[:2]
        return ImageSpec(channels, size, size, context=("measurement",))

    def make_env(self, reward: Reward, num_envs: int, device: str | torch.device = "cpu",
                 evaluation: bool = False) -> DenoisingEnv:  # fmt: skip
        """Training envs draw measurements of the train split at random; evaluation envs take the first held-out
        cases in order, so every evaluation shows the same cases."""
        from rlft.envs.inverse import InverseProblemEnv, MeasurementCases, make_operator

        sample_shape = self.sample_shape()
        operator = make_operator(self.operator, self.scale, self.hole_fraction)
        images = load_ground_truths(self, "heldout" if evaluation else "train")
        if tuple(images.shape[1:]) != tuple(sample_shape):
            raise ValueError(f"env.dataset={self.dataset} gives images of shape {tuple(images.shape[1:])} but the "
                             f"base model samples {tuple(sample_shape)}; match env.image_size to the model")
        noise_seed = self.noise_seed + (1 if evaluation else 0)  # each split's measurement noise is fixed
        cases = MeasurementCases.make(images, operator, self.sigma_y, noise_seed)
        return InverseProblemEnv(num_envs=num_envs, sample_shape=sample_shape, schedule=self.schedule(), reward=reward,
                                 operator=operator, sigma_y=self.sigma_y, cases=cases, evaluation=evaluation,
                                 samples_per_case=self.samples_per_case, device=device)  # fmt: skip


def load_ground_truths(env: InverseEnvConfig, split: str) -> torch.Tensor:
    """Images in [-1, 1], [N, C, H, W], of the "train" split (training measurements) or "heldout" (evaluation)."""
    if env.dataset == "digits":
        from rlft.envs.digits import load_digits

        return load_digits(split)[0]
    from rlft.envs.flowers import load_flowers102

    return load_flowers102(split, env.data_root, env.image_size)


@dataclass
class StableDiffusionEnvConfig(EnvConfig):
    """Stable Diffusion 1.5 (latent diffusion): prompts as context, classifier-free guidance, the VAE decoding x_0
    before the reward. Loads unet/, vae/, text_encoder/, tokenizer/ and scheduler/ only."""

    KIND: ClassVar[str] = "stable_diffusion"
    LATENT: ClassVar[bool] = True
    resolution: int = knob(512, "image side in pixels; the latents are resolution / 8", ge=8)
    guidance_scale: float = knob(5.0, "classifier-free guidance weight w of sampling (DDPO uses 5); 1 = the "
                                 "conditional model only", ge=0)  # fmt: skip
    negative_prompt: str = knob("", "the unconditional prompt of classifier-free guidance (its null context)")
    prompt_file: str | None = knob(None, "a text file, one prompt per line; when given it replaces env.prompts")
    prompts: list[str] = knob(["a photo of a cat", "a photo of a dog", "a photo of a horse", "a photo of a monkey",
                               "a photo of a rabbit", "a photo of a zebra", "a photo of a spider", "a photo of a bird"],
                              "training prompts, each trajectory's drawn uniformly (DDPO's animals, shortened)")
    eval_prompt_file: str | None = knob(None, "a text file of held-out evaluation prompts; replaces env.eval_prompts")
    eval_prompts: list[str] = knob(["a photo of a fox", "a photo of a cow", "a photo of an owl", "a photo of a goat"],
                                   "held-out prompts the evaluations use (never trained on)")  # fmt: skip

    def check(self) -> None:
        from rlft.envs.models import check_stable_diffusion

        check_stable_diffusion(self.base_model, self.revision)

    def latent_channels_and_factor(self) -> tuple[int, int]:
        from rlft.envs.models import load_sd_config

        vae = load_sd_config(self.base_model, "vae", self.revision)
        return vae["latent_channels"], 2 ** (len(vae["block_out_channels"]) - 1)

    def image_spec(self) -> ImageSpec:
        return ImageSpec(3, self.resolution, self.resolution, context=("prompts",))

    def sample_shape(self) -> tuple[int, int, int]:
        channels, factor = self.latent_channels_and_factor()
        return (channels, self.resolution // factor, self.resolution // factor)

    def scheduler_config(self) -> dict:
        from rlft.envs.models import load_sd_config

        return load_sd_config(self.base_model, "scheduler", self.revision)

    def network_config(self) -> dict:
        from rlft.envs.models import load_sd_config

        return load_sd_config(self.base_model, "unet", self.revision)

    def load_network(self) -> torch.nn.Module:
        from rlft.envs.models import load_sd_unet

        return load_sd_unet(self.base_model, self.revision)

    def make_env(self, reward: Reward, num_envs: int, device: str | torch.device = "cpu",
                 evaluation: bool = False) -> DenoisingEnv:  # fmt: skip
        from rlft.envs.stable_diffusion import make_stable_diffusion_env

        return make_stable_diffusion_env(self, reward, num_envs, device, evaluation)


@dataclass
class StableDiffusion3EnvConfig(StableDiffusionEnvConfig):
    """Stable Diffusion 3 / 3.5 (a latent rectified flow; an MMDiT velocity network): prompts as context through its
    three text encoders (two CLIPs and T5; text_encoder_3/ may be left out, then the T5 tokens are zeros), classifier-
    free guidance, the VAE (16 channels, scaled and shifted) decoding x_0 before the reward. The MDP steps the flow
    sampler (rlft.core.flow) on the scheduler's shifted grid. Loads transformer/, vae/, text_encoder*/, tokenizer*/
    and scheduler/ only."""

    KIND: ClassVar[str] = "sd3"
    FLOW: ClassVar[bool] = True
    num_inference_steps: int = knob(10, "sampler steps per trajectory on the scheduler's shifted grid (Flow-GRPO "
                                    "trains on 10)", ge=1)  # fmt: skip
    eta: float = knob(1.0, "SDE noise as a fraction of the memoryless one (a = eta sqrt(2)): 1 = memoryless (Adjoint "
                      "Matching's), 0.5 = Flow-GRPO's a = 0.7, 0 = the deterministic ODE", ge=0, le=1)  # fmt: skip
    guidance_scale: float = knob(4.5, "classifier-free guidance weight w of sampling (SD 3.5's and Flow-GRPO's 4.5); "
                                 "1 = the conditional model only", ge=0)  # fmt: skip
    max_sequence_length: int = knob(256, "T5 tokens per prompt (SD3's pipelines use 256)", ge=1)

    def check(self) -> None:
        from rlft.envs.models import check_sd3

        check_sd3(self.base_model, self.revision)

    def scheduler_config(self) -> dict:
        from rlft.envs.models import load_sd_config

        return load_sd_config(self.base_model, "scheduler", self.revision, what="Stable Diffusion 3")

    def network_config(self) -> dict:
        from rlft.envs.models import load_sd_config

        return load_sd_config(self.base_model, "transformer", self.revision, what="Stable Diffusion 3")

    def schedule(self) -> FlowSchedule:
        return FlowSchedule.from_scheduler_config(self.scheduler_config(), self.num_inference_steps, self.eta)

    def load_network(self) -> torch.nn.Module:
        from rlft.envs.models import load_sd3_transformer

        return load_sd3_transformer(self.base_model, self.revision)

    def make_env(self, reward: Reward, num_envs: int, device: str | torch.device = "cpu",
                 evaluation: bool = False) -> DenoisingEnv:  # fmt: skip
        from rlft.envs.stable_diffusion import make_sd3_env

        return make_sd3_env(self, reward, num_envs, device, evaluation)


ENV_KINDS: dict[str, type[EnvConfig]] = {cls.KIND: cls for cls in (DDPMEnvConfig, FlowEnvConfig, InverseEnvConfig,
                                                                   StableDiffusionEnvConfig,
                                                                   StableDiffusion3EnvConfig)}  # fmt: skip


def digits_inverse(name: str, operator: str, samples_per_case: int) -> InverseEnvConfig:
    return InverseEnvConfig(name=name, base_model=BUILTIN_DIGITS, num_inference_steps=20, operator=operator,
                            samples_per_case=samples_per_case)  # fmt: skip


# env=<preset> -> algo=<name> -> {algo key: value}: an env's own defaults for an algorithm's keys, applied when the
# run's env and algo match, on the preset's own base model (env.base_model unchanged: the one measured), to the keys
# the command line does not set (rlft/config.py compose_config); every other default is the algorithm's Config.
ALGO_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    # plain DRaFT fools the digit classifier (judge: 3s at within-class diversity 0.32); with these, measured by
    # benchmarks/reward_hacking.py (benchmarks/measured/reward_hacking-draft_full_aux0.3_kl0.03-2cores-2026-12-03
    # .json, epoch 50): judge 0.84 3s at confidence 0.942 (base 0.955), within-class diversity 0.864. Not the
    # Config's defaults: algo.aux_data is the digits train split, which fits no other env.
    "digits": {"draft": {"aux_loss_weight": 0.3, "kl_weight": 0.03, "epochs": 50}},
}


# env=<preset>: each a config of its kind with the values that differ from the kind's defaults
ENV_PRESETS: dict[str, EnvConfig] = {
    # the embedded default: the shipped 16x16 digits DDPM (envs/digits.py)
    "digits": DDPMEnvConfig(name="digits", base_model=BUILTIN_DIGITS, num_inference_steps=10, default_reward="digit",
                            default_judge="digit_judge"),
    # the digits DDPM's flow-matching twin (rectified flow, velocity prediction; rlft.pretrain), the same task
    "digits_flow": FlowEnvConfig(name="digits_flow", base_model="builtin:digits_flow", default_reward="digit",
                                 default_judge="digit_judge"),
    # any unconditional pixel-space flow-matching UNet2DModel folder (env.base_model=...)
    "flow": FlowEnvConfig(name="flow"),
    # 4x super-resolution and inpainting of held-out digits (DEFT's tasks on the shipped model)
    "digits_sr": digits_inverse("digits_sr", "sr", samples_per_case=4),
    "digits_inpaint": digits_inverse("digits_inpaint", "inpaint", samples_per_case=1),
    # google/ddpm-*: unconditional DDPMs of Ho et al. 2020; CelebA-HQ with ddpo-celebahq's OVER50 task and 40 steps
    "celebahq": DDPMEnvConfig(name="celebahq", base_model="google/ddpm-celebahq-256", num_inference_steps=40,
                              default_reward="over50"),
    "church": DDPMEnvConfig(name="church", base_model="google/ddpm-church-256", num_inference_steps=40,
                            default_reward="aesthetic"),
    "cifar10": DDPMEnvConfig(name="cifar10", base_model="google/ddpm-cifar10-32", num_inference_steps=20),
    # any unconditional diffusers DDPM: a folder written by rlft.pretrain, or a Hub id (env.base_model=...)
    "ddpm": DDPMEnvConfig(name="ddpm"),
    # 4x super-resolution of Oxford Flowers102 with your own pretrained DDPM (envs/flowers.py)
    "flowers102_sr": InverseEnvConfig(name="flowers102_sr", num_inference_steps=50, dataset="flowers102"),
    # Stable Diffusion 1.5 with DDPO's prompts and guidance, scored by a prompt-image reward (PickScore, a CLIP-H)
    # and judged by one of another family (ImageReward, a BLIP)
    "sd15": StableDiffusionEnvConfig(name="sd15", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
                                     num_inference_steps=50, default_reward="pickscore", default_judge="image_reward"),
    # Stable Diffusion 3.5 Medium (a flow-matching MMDiT) at Flow-GRPO's 512 px, 10 steps and w = 4.5, with the same
    # reward and judge as sd15
    "sd35_medium": StableDiffusion3EnvConfig(name="sd35_medium", base_model="stabilityai/stable-diffusion-3.5-medium",
                                             default_reward="pickscore", default_judge="image_reward"),
}


def preset(name: str, **overrides: Any) -> EnvConfig:
    """A copy of the preset `name` with some keys changed, e.g. preset("celebahq", base_model="/models/celebahq")."""
    return dataclasses.replace(ENV_PRESETS[name], **overrides)


# ---- gymnasium entry points: gymnasium.make("rlft/<Task>-v0", ...) and make_vec(..., vectorization_mode=...) ----
def make_preset_vector_env(preset_name: str, num_envs: int = 16, reward: dict | Reward | None = None,
                           device: str | torch.device = "cpu", evaluation: bool = False,
                           **overrides: Any) -> DenoisingEnv:  # fmt: skip
    """The batched env of a preset, e.g. `gymnasium.make_vec("rlft/CelebAHQ-v0", 8, vectorization_mode=
    "vector_entry_point", base_model="/models/celebahq")`; `reward` is a built Reward, or {"name": ..., kwargs}
    (default: the preset's own reward)."""
    from rlft.envs.rewards import make_reward

    env_cfg = preset(preset_name, **overrides)
    if not isinstance(reward, Reward):
        spec = dict(reward or {"name": env_cfg.default_reward})
        reward = make_reward(spec.pop("name"), device, **spec)
    return env_cfg.make_env(reward, num_envs, device, evaluation)


def make_preset_env(preset_name: str, **kwargs: Any) -> SingleDenoisingEnv:
    """`gymnasium.make("rlft/<Task>-v0", ...)`: one sample at a time, numpy arrays."""
    return SingleDenoisingEnv(make_preset_vector_env(preset_name, 1, **kwargs))

