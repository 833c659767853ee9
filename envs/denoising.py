"""Denoising as a Gymnasium MDP (DDPO, Black et al. 2023, sec. 4.1).

State s_k = (x_t, t, c) with t = schedule.timesteps[k]; action a_k = x_{t-1}; reward 0 until the last step,
then r(D(x_0), c), where D decodes latents to images (the identity for pixel-space models). The env owns the
schedule, the context sampler, the decoder and the reward, never the network: a policy is built with `env.schedule`
to form its Gaussian transition. `DenoisingEnv` is natively batched on torch tensors (on the policy's device);
`SingleDenoisingEnv` is its one-sample numpy form for `gymnasium.utils.env_checker`. Stepping with a differentiable
action keeps the autograd graph through to the reward (DRaFT).

What rollouts, algorithms and evaluations use:
    reset(seed, options) / step(action)   the MDP
    score(x_0, context)                   (rewards [B], finite [B]) of final samples, differentiable: decode, reward
    reward_context(context)               the reward's keywords for a batch of contexts (prompts=, measurement=)
    describe(images, context)             evaluation metrics of final images (and, for inverse problems, a panel)
    null_context                          [1, *ctx] the unconditional context of classifier-free guidance, or None
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from rlft.core.flow import FlowSchedule
from rlft.core.schedule import DDIMSchedule
from rlft.envs.rewards import Reward, cut_gradient, evaluate_reward

ContextSampler = Callable[[int, torch.Generator], torch.Tensor]  # (n, generator) -> [n, *context_shape]
Decoder = Callable[[torch.Tensor], torch.Tensor]  # x_0 of the MDP (e.g. SD latents) -> images in [-1, 1]


def no_context(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.zeros(n, 0)  # unconditional models see an empty context


def no_reward_context(context: torch.Tensor) -> dict[str, Any]:
    return {}


class DenoisingEnv(gymnasium.vector.VectorEnv):
    metadata = {"autoreset_mode": AutoresetMode.DISABLED, "render_modes": []}

    def __init__(
        self,
        num_envs: int,
        sample_shape: tuple[int, ...],
        schedule: DDIMSchedule | FlowSchedule,
        reward: Reward,
        context_sampler: ContextSampler = no_context,
        context_shape: tuple[int, ...] = (0,),
        device: str | torch.device = "cpu",
        decoder: Decoder | None = None,
        reward_context: Callable[[torch.Tensor], dict[str, Any]] = no_reward_context,
        null_context: torch.Tensor | None = None,
    ):
        self.num_envs = num_envs
        self.sample_shape = tuple(sample_shape)
        self.device = torch.device(device)
        self.schedule = schedule.to(self.device)
        self.reward = reward
        self.context_sampler = context_sampler
        self.decoder = decoder  # None: the MDP's x_0 is the image itself (pixel-space DDPMs)
        self._reward_context = reward_context
        self.null_context = None if null_context is None else null_context.to(self.device)  # [1, *ctx]
        unbounded = dict(low=-np.inf, high=np.inf, dtype=np.float32)
        if schedule.timesteps.is_floating_point():  # a flow model reads t * num_train_timesteps, a float
            timestep_space = spaces.Box(low=0.0, high=float(schedule.num_train_timesteps), shape=(), dtype=np.float32)
        else:  # a DDPM reads its integer training timestep
            timestep_space = spaces.Discrete(schedule.num_train_timesteps)
        self.single_observation_space = spaces.Dict(
            {
                "x_t": spaces.Box(shape=self.sample_shape, **unbounded),
                "timestep": timestep_space,
                "context": spaces.Box(shape=tuple(context_shape), **unbounded),
            }
        )
        self.single_action_space = spaces.Box(shape=self.sample_shape, **unbounded)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._step_index: int | None = None

    @property
    def horizon(self) -> int:
        """Steps per episode: one per sampler step."""
        return self.schedule.num_steps

    def _observation(self) -> dict[str, torch.Tensor]:
        timestep = self.schedule.timesteps[min(self._step_index, self.schedule.num_steps - 1)]
        return {"x_t": self.x_t, "timestep": timestep.expand(self.num_envs), "context": self.context}

    def decode(self, x_0: torch.Tensor) -> torch.Tensor:
        """The image the reward sees: x_0 itself, or its decoding (the VAE of a latent diffusion model)."""
        return x_0 if self.decoder is None else self.decoder(x_0)

    def reward_context(self, context: torch.Tensor) -> dict[str, Any]:
        """The reward's keywords for contexts [B, *ctx]: prompts=[...] (text-to-image), measurement=y (inverse)."""
        return self._reward_context(context)

    def score(self, x_0: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards [B] float32, finite [B] bool) of final samples x_0; differentiable in x_0 (through the decoder)
        when x_0 requires grad, with the gradient of samples whose reward is not finite cut (also before the decoder,
        whose backward could turn their zero gradient into NaN)."""
        rewards, finite = evaluate_reward(self.reward, self.decode(x_0), self.reward_context(context))
        if x_0.requires_grad and self.decoder is not None and not bool(finite.all()):
            cut_gradient(x_0, finite)
        return rewards, finite

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """`options={"group_size": G}` draws num_envs / G contexts, each for G consecutive samples (GRPO's groups:
        several samples of one prompt); by default every sample draws its own."""
        super().reset(seed=seed)
        group_size = int((options or {}).get("group_size", 1))
        if group_size < 1 or self.num_envs % group_size:
            raise ValueError(f"group_size={group_size} must divide the env's batch of {self.num_envs} samples")
        generator = torch.Generator().manual_seed(int(self.np_random.integers(2**63 - 1)))
        self.x_t = torch.randn((self.num_envs, *self.sample_shape), generator=generator).to(self.device)
        contexts = self.context_sampler(self.num_envs // group_size, generator)  # [B / G, *context_shape]
        self.context = contexts.repeat_interleave(group_size, dim=0).to(self.device)  # [B, *context_shape]
        self._step_index = 0
        return self._observation(), {}

    def step(self, action: torch.Tensor):
        if self._step_index is None or self._step_index >= self.schedule.num_steps:
            raise RuntimeError("the episode is over (or never began): call reset() before step()")
        expected = (self.num_envs, *self.sample_shape)
        if tuple(action.shape) != expected:
            raise ValueError(f"action has shape {tuple(action.shape)}; this env expects x_(t-1) of shape {expected}")
        self.x_t = action.to(self.device)  # no detach: a differentiable action keeps its graph
        self._step_index += 1
        done = self._step_index == self.schedule.num_steps
        reward = torch.zeros(self.num_envs, device=self.device)
        info = {}
        if done:
            reward, finite = self.score(self.x_t, self.context)
            info = {"reward_finite": finite}
        terminated = torch.full((self.num_envs,), done, device=self.device)
        truncated = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        return self._observation(), reward, terminated, truncated, info

    def describe(self, images: torch.Tensor, context: torch.Tensor) -> dict:
        """Evaluation metrics of final samples: the reward's own here; tasks with ground truth add theirs and may
        give a `panel` of images to show instead of the samples (envs/inverse.py)."""
        return self.reward.describe(images, **self.reward_context(context))


class SingleDenoisingEnv(gymnasium.Env):
    """One-sample, numpy form of `DenoisingEnv`, for Gymnasium's env checker and classic RL tooling."""

    metadata = {"render_modes": []}

    def __init__(self, vector_env: DenoisingEnv):
        if vector_env.num_envs != 1:
            raise ValueError(f"SingleDenoisingEnv wraps a vector env of one sample, got num_envs={vector_env.num_envs}")
        self.vector_env = vector_env
        self.observation_space = self.vector_env.single_observation_space
        self.action_space = self.vector_env.single_action_space

    def _numpy(self, obs: dict[str, torch.Tensor]) -> dict:
        return {
            "x_t": obs["x_t"][0].detach().cpu().numpy().astype(np.float32),
            "timestep": self._timestep(obs["timestep"][0]),
            "context": obs["context"][0].detach().cpu().numpy().astype(np.float32),
        }

    def _timestep(self, timestep: torch.Tensor):
        if isinstance(self.observation_space["timestep"], spaces.Discrete):
            return np.int64(timestep.item())
        return np.asarray(timestep.item(), dtype=np.float32)

    def decode(self, x_0: np.ndarray) -> np.ndarray:
        """The image the reward sees for one final sample x_0 (an array of the action's shape)."""
        decoded = self.vector_env.decode(torch.as_tensor(np.asarray(x_0, dtype=np.float32)).unsqueeze(0))
        return decoded[0].detach().cpu().numpy()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        obs, info = self.vector_env.reset(seed=int(self.np_random.integers(2**31 - 1)), options=options)
        return self._numpy(obs), info

    def step(self, action):
        action = torch.as_tensor(np.asarray(action, dtype=np.float32)).unsqueeze(0)
        obs, reward, terminated, truncated, info = self.vector_env.step(action)
        info = {k: v[0].item() for k, v in info.items()}
        return self._numpy(obs), float(reward[0]), bool(terminated[0]), bool(truncated[0]), info
