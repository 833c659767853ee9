"""Adjoint Matching: lean adjoint == autograd, the tilted-Gaussian optimum on a toy, CFG regimes, the worker hook,
Stable Diffusion (latents through the VAE decoder), and non-finite rewards."""

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from tensordict import TensorDict
from torch import nn

from rlft.algorithms import LearnerContext
from rlft.algorithms import adjoint_matching as am
from rlft.buffer import TrajectoryBuffer
from rlft.config import ConfigError, compose, validate
from rlft.core.flow import FlowSchedule
from rlft.core.sampler import ddim_step
from rlft.core.schedule import DDIMSchedule
from rlft.learner import Learner
from rlft.policy import DiffusionPolicy
from rlft.rollout import RolloutWorker, build_policy
from tests.helpers import tiny_cfg
from tests.python_rewards import smooth as smooth_reward  # a non-quadratic differentiable reward

CPU = torch.device("cpu")


def smooth_score(x_0: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`smooth_reward` as an env's score: (rewards [B], finite [B])."""
    rewards = smooth_reward(x_0)
    return rewards, torch.isfinite(rewards.detach())


def tiny_conditional_policy(schedule: DDIMSchedule, guidance_scale: float = 1.0) -> DiffusionPolicy:
    """A tiny UNet2DConditionModel behind a policy that guides with a random null context, with a frozen reference."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    )  # fmt: skip
    null_context = torch.randn(1, 2, 8)  # [1, tokens, cross_attention_dim]: stands in for the negative prompt's
    policy = DiffusionPolicy(unet, schedule, null_context=null_context, guidance_scale=guidance_scale).eval()
    policy.keep_reference()
    return policy


def ddim_schedule(num_steps: int, beta_schedule: str = "squaredcos_cap_v2") -> DDIMSchedule:
    config = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule).config
    return DDIMSchedule.from_scheduler_config(dict(config), num_steps, eta=1.0)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_lean_adjoint_equals_autograd_through_the_deterministic_base_chain(guidance_scale):
    """a_k = -lambda d r(x_T) / d x_k when x_{k+1} = base_det(x_k): the VJP recursion is backprop, step by step."""
    schedule = ddim_schedule(4)
    policy = tiny_conditional_policy(schedule)
    torch.manual_seed(1)
    context = torch.randn(3, 2, 8)  # [B, tokens, cross_attention_dim]
    lam = 7.0
    x = torch.randn(3, 1, 8, 8).requires_grad_(True)
    chain = [x]
    for k in range(schedule.num_steps):
        chain.append(am.deterministic_mean(policy, chain[-1], k, context, guidance_scale).mean)
    expected = torch.autograd.grad((lam * smooth_reward(chain[-1])).sum(), chain[1:])
    latents = torch.stack([c.detach() for c in chain], dim=1)  # [B, T+1, 1, 8, 8]
    adjoint, base_mean = am.lean_adjoint(policy, latents, context, smooth_score, lam, guidance_scale)
    for k in range(schedule.num_steps):  # adjoint[:, k] is a at latents[:, k+1]
        torch.testing.assert_close(adjoint[:, k], -expected[k], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(base_mean, latents[:, 1:])
    assert adjoint[:, 0].abs().max() > 0


def test_deterministic_mean_is_classifier_free_guidance_of_the_two_predictions():
    schedule = ddim_schedule(4)
    policy = tiny_conditional_policy(schedule)
    torch.manual_seed(2)
    x, context, w, k = torch.randn(2, 1, 8, 8), torch.randn(2, 2, 8), 2.5, 1
    with torch.no_grad():
        timestep = schedule.timesteps[k].expand(2)
        null = policy.null_context.expand(2, -1, -1)
        eps_cond, eps_null = policy(x, timestep, context, guidance_scale=1.0), policy(x, timestep, null,
                                                                                       guidance_scale=1.0)
        guided = am.deterministic_mean(policy, x, k, context, w)
        plain = am.deterministic_mean(policy, x, k, context, 1.0)
    expected = ddim_step(schedule, k, eps_null + w * (eps_cond - eps_null), x, noise=torch.zeros_like(x))
    torch.testing.assert_close(guided.mean, expected.mean, rtol=1e-4, atol=1e-5)
    assert (guided.mean - plain.mean).abs().max() > 1e-4
    torch.testing.assert_close(guided.std, schedule.std[k].expand(2).reshape(2, 1, 1, 1))


def test_guidance_regimes_change_the_adjoint_and_the_control_and_train():
    schedule = ddim_schedule(4)
    base = tiny_conditional_policy(schedule, guidance_scale=4.0).requires_grad_(False)  # sampling guidance w = 4
    torch.manual_seed(3)
    batch = TensorDict({"latents": torch.randn(4, 5, 1, 8, 8), "context": torch.randn(4, 2, 8),
                        "noise": torch.randn(4, 4, 1, 8, 8), "reward": torch.zeros(4)}, batch_size=[4])  # fmt: skip

    def prepared(**flags):
        cfg = am.Config(reward_multiplier=5.0, minibatch_size=4, **flags)
        return cfg, am.add_lean_adjoints(batch.clone(), base, smooth_score, cfg)

    _, plain = prepared()
    _, adjoint_guided = prepared(guidance_in_adjoint_computation=True)
    cfg, full = prepared(guidance_in_adjoint_computation=True, guidance_in_control_computation=True)
    # the adjoint's final value -lambda grad r does not depend on guidance; earlier ones do
    torch.testing.assert_close(plain["adjoint"][:, -1], adjoint_guided["adjoint"][:, -1])
    assert (plain["adjoint"][:, 0] - adjoint_guided["adjoint"][:, 0]).abs().max() > 1e-4
    torch.testing.assert_close(plain["base_mean"], adjoint_guided["base_mean"])  # the control stays unguided
    torch.testing.assert_close(full["adjoint"], adjoint_guided["adjoint"])
    assert (full["base_mean"] - plain["base_mean"]).abs().max() > 1e-4
    # a train step in the full-CFG regime starts from u = 0 (fine-tuned == base) and moves the weights
    policy = copy.deepcopy(base).train()
    policy.unet.requires_grad_(True)  # the network trains; its frozen reference copy does not
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = torch.optim.AdamW(policy.unet.parameters(), lr=1e-3)
    buffer = TrajectoryBuffer(4, 4, 0)
    ctx = LearnerContext(policy, policy, optimizer, None, buffer, torch.Generator().manual_seed(0), torch.device("cpu"))
    metrics = am.train_step(ctx, full, cfg, am.make_state(cfg))
    assert math.isfinite(metrics["loss/adjoint_matching"]) and metrics["train/grad_norm"] > 0
    assert any((p.detach() - b).abs().max() > 0 for p, b in zip(policy.parameters(), before, strict=True))


def test_loss_is_zero_for_the_control_minus_sigma_adjoint():
    """The regression target: u sqrt(dt) = -sigma a gives zero loss; the loss is the squared residual."""
    base_mean, adjoint = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    sigma = torch.tensor([0.5, 0.2, 0.1]).reshape(3, 1, 1, 1)
    optimal = base_mean - sigma**2 * adjoint
    assert am.adjoint_matching_loss(optimal, base_mean, sigma, adjoint).abs().max() < 1e-10
    off = optimal + 0.1 * sigma
    torch.testing.assert_close(am.adjoint_matching_loss(off, base_mean, sigma, adjoint), torch.full((3,), 0.01 * 16))


def test_stratified_steps_take_one_step_from_each_stratum():
    steps = am.stratified_steps(torch.arange(9), 500, 4, torch.Generator().manual_seed(0))
    strata = [set(s.tolist()) for s in torch.tensor_split(torch.arange(9), 4)]
    for j, stratum in enumerate(strata):
        assert set(steps[:, j].tolist()) == stratum  # every step of the stratum is drawn, none outside it


# ---- the Gaussian toy: exact base model, quadratic reward, closed-form tilted optimum ----


class GaussianToyNetwork(nn.Module):
    """The exact noise prediction of N(m, s^2) data under the DDPM forward process plus a learned correction
    c_t + d_t x per timestep t (zero at init; the optimal control of this linear-quadratic problem is affine in x).
    Exact part: E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) m) / (ab s^2 + 1 - ab), ab = alpha-bar_t."""

    def __init__(self, alphas_cumprod: torch.Tensor, mean: float, std: float):
        super().__init__()
        self.config = SimpleNamespace(cross_attention_dim=None)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.data_mean, self.data_std = mean, std
        self.correction = nn.Embedding(len(alphas_cumprod), 2)  # (c_t, d_t) for every training timestep
        nn.init.zeros_(self.correction.weight)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> SimpleNamespace:
        ab = self.alphas_cumprod[timestep].unsqueeze(1)  # [B, 1]
        exact = (1 - ab).sqrt() * (x - ab.sqrt() * self.data_mean) / (ab * self.data_std**2 + 1 - ab)
        offset, slope = self.correction(timestep).chunk(2, dim=1)  # [B, 1] each
        return SimpleNamespace(sample=exact + offset + slope * x)


class GaussianFlowToyNetwork(nn.Module):
    """The exact velocity of N(m, s^2) data on the rectified flow x_t = (1 - t) x_0 + t e, plus a learned correction
    c_k + d_k x per grid time (zero at init). Exact part: v = E[e - x_0 | x_t] = -m + (t - (1 - t) s^2) (x_t -
    (1 - t) m) / ((1 - t)^2 s^2 + t^2), affine in x_t as the DDPM's is (tests/test_flow_sampler.py derives it)."""

    def __init__(self, timesteps: torch.Tensor, num_train_timesteps: int, mean: float, std: float):
        super().__init__()
        self.config = SimpleNamespace(cross_attention_dim=None)
        self.register_buffer("grid", timesteps.float())  # the network inputs it will see, sigma * 1000
        self.num_train_timesteps = num_train_timesteps
        self.data_mean, self.data_std = mean, std
        self.correction = nn.Embedding(len(timesteps), 2)  # (c_k, d_k) for every grid time
        nn.init.zeros_(self.correction.weight)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> SimpleNamespace:
        t = (timestep.float() / self.num_train_timesteps).unsqueeze(1)  # [B, 1]
        m, s2 = self.data_mean, self.data_std**2
        exact = -m + (t - (1 - t) * s2) * (x - (1 - t) * m) / ((1 - t) ** 2 * s2 + t**2)
        index = (timestep.float().unsqueeze(1) - self.grid).abs().argmin(dim=1)  # which grid time
        offset, slope = self.correction(index).chunk(2, dim=1)  # [B, 1] each
        return SimpleNamespace(sample=exact + offset + slope * x)


def gaussian_toy_base(family: str) -> DiffusionPolicy:
    """The exact base model of N(0, 1) data and its memoryless 10-step sampler: DDIM eta = 1 on a DDPM, or the
    memoryless SDE (a = sqrt(2)) on a rectified flow, the schedule Adjoint Matching was introduced with."""
    if family == "ddpm":
        # clip_sample=False: the sampler honours the scheduler's clipping of x0_hat, which would make the steps
        # non-affine
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
        schedule = DDIMSchedule.from_scheduler_config(dict(scheduler.config), 10, eta=1.0)
        network = GaussianToyNetwork(scheduler.alphas_cumprod, 0.0, 1.0)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        schedule = FlowSchedule.from_scheduler_config(dict(scheduler.config), 10, eta=1.0)
        network = GaussianFlowToyNetwork(schedule.timesteps, 1000, 0.0, 1.0)
    return DiffusionPolicy(network, schedule).requires_grad_(False)


def sample_toy(policy: DiffusionPolicy, n: int, generator: torch.Generator) -> TensorDict:
    """Trajectories of the memoryless sampler, as rollout workers record them."""
    x = torch.randn(n, 1, generator=generator)
    latents, noises = [x], []
    with torch.no_grad():
        for k in range(policy.schedule.num_steps):
            noise = torch.randn(n, 1, generator=generator)
            x = policy.step(x, k, torch.zeros(n, 0), noise=noise).prev_sample
            latents.append(x)
            noises.append(noise)
    return TensorDict({"latents": torch.stack(latents, 1), "noise": torch.stack(noises, 1),  # [n, T+1, 1], [n, T, 1]
                       "context": torch.zeros(n, 0), "reward": torch.zeros(n),
                       "policy_version": torch.zeros(n, dtype=torch.int64)}, batch_size=[n])  # fmt: skip


def affine_steps(base: DiffusionPolicy) -> tuple[list[float], list[float], list[float]]:
    """The base sampler of the toy is affine: x_{k+1} = A_k x_k + c_k + sigma_k xi. Returns (A, c, sigma^2)."""
    slopes, offsets, variances = [], [], []
    for k in range(base.schedule.num_steps):
        at_zero, at_one = (am.deterministic_mean(base, torch.tensor([[v]]), k, torch.zeros(1, 0), 1.0).mean.item()
                           for v in (0.0, 1.0))  # fmt: skip
        slopes.append(at_one - at_zero)
        offsets.append(at_zero)
        variances.append(base.schedule.std[k].item() ** 2)
    return slopes, offsets, variances


def discrete_am_fixed_point(base: DiffusionPolicy, lam: float, target: float) -> tuple[float, float]:
    """(mean, variance) of x_0 under the exact fixed point of the discretised AM regression, r = -(x - y)^2 / 2.

    The regression makes the fine-tuned mean f_k(x) = A_k x + c_k - sigma_k^2 E[a_{k+1} | x_k = x], and the lean
    adjoint is a_{k+1} = lam P_{k+1} (x_0 - y), P_{k+1} the product of the base slopes after step k. With
    E[x_0 | x_{k+1}] = M x_{k+1} + m under the fine-tuned chain, f = A x + c - sigma^2 lam P (M f + m - y), so
    f = (A x + c - g (m - y)) / (1 + g M) with g = sigma^2 lam P: a backward recursion, then the forward moments.
    """
    slopes, offsets, variances = affine_steps(base)
    num_steps = len(slopes)
    fine_slopes, fine_offsets = [0.0] * num_steps, [0.0] * num_steps
    to_final_slope, to_final_offset, base_product = 1.0, 0.0, 1.0
    for k in reversed(range(num_steps)):
        g = variances[k] * lam * base_product
        fine_slopes[k] = slopes[k] / (1 + g * to_final_slope)
        fine_offsets[k] = (offsets[k] - g * (to_final_offset - target)) / (1 + g * to_final_slope)
        to_final_offset += to_final_slope * fine_offsets[k]
        to_final_slope *= fine_slopes[k]
        base_product *= slopes[k]
    mean, var = 0.0, 1.0
    for k in range(num_steps):
        mean, var = fine_slopes[k] * mean + fine_offsets[k], fine_slopes[k] ** 2 * var + variances[k]
    return mean, var


@pytest.mark.parametrize(("family", "fills", "passes"), [("ddpm", 20, 4), ("flow", 30, 8)])
def test_gaussian_toy_reaches_the_closed_form_tilted_gaussian(family, fills, passes):
    """Data N(0, 1), exact base model, r(x) = -(x - 2)^2 / 2, lambda = 1, 10 memoryless steps (DDIM, or the flow's
    memoryless SDE).

    Oracle 1, the continuous-time optimum: the base sampler's own final marginal N(mu_b, v_b) (closed form: every
    step is affine) tilted by exp(lambda r): v* = 1 / (1 / v_b + lambda), mu* = v* (mu_b / v_b + lambda y).
    Tolerance: 0.04 on the mean and 0.07 on the variance, which covers the O(step) discretisation gap (the
    controlled sampler keeps each step's noise sigma_k, where the exact tilt also narrows it; 0.036 at 10 steps).
    Oracle 2, the exact fixed point of the discretised AM regression (`discrete_am_fixed_point`): 0.03 on both.
    The base is far from both: mean 0 (vs ~0.71 DDPM, ~0.77 flow), variance ~0.55 / ~0.62 (vs ~0.35-0.42). The
    flow's regression converges more slowly (after 20 fills of 4 passes its mean is still 0.1 short), so it gets
    30 fills of 8 passes.
    """
    torch.manual_seed(0)
    base = gaussian_toy_base(family)
    policy = copy.deepcopy(base).requires_grad_(True)
    base.keep_reference()  # the lean adjoints step the frozen base model
    target, lam = 2.0, 1.0

    def reward(x, context):  # an env's score: (rewards, finite)
        values = -0.5 * ((x - target) ** 2).sum(1)
        return values, torch.isfinite(values.detach())

    slopes, offsets, variances = affine_steps(base)
    base_mean, base_var = 0.0, 1.0
    for a, c, v in zip(slopes, offsets, variances, strict=True):
        base_mean, base_var = a * base_mean + c, a**2 * base_var + v
    tilted_var = 1 / (1 / base_var + lam)
    tilted_mean = tilted_var * (base_mean / base_var + lam * target)
    fixed_mean, fixed_var = discrete_am_fixed_point(base, lam, target)

    cfg = am.Config(lr=1e-2, minibatch_size=256, reward_multiplier=lam, num_train_timesteps=9,
                    passes_per_buffer=passes)  # fmt: skip
    buffer = TrajectoryBuffer(1024, cfg.minibatch_size, max_staleness=0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(0)
    ctx = LearnerContext(policy, policy, optimizer, None, buffer, generator, torch.device("cpu"))
    state = am.make_state(cfg)
    for _ in range(fills):  # buffered AM: a fresh buffer of 1024 trajectories, `passes` passes over it
        buffer.replace_contents(am.add_lean_adjoints(sample_toy(policy, 1024, generator), base, reward, cfg))
        am.update(ctx, cfg, state)
    final = sample_toy(policy, 20000, generator)["latents"][:, -1, 0]
    base_final = sample_toy(base, 20000, generator)["latents"][:, -1, 0]
    assert abs(base_final.mean().item() - base_mean) < 0.03 and abs(base_final.var().item() / base_var - 1) < 0.05
    mean, var = final.mean().item(), final.var().item()
    assert abs(mean - tilted_mean) < 0.04 and abs(var - tilted_var) < 0.07, (mean, var, tilted_mean, tilted_var)
    assert abs(mean - fixed_mean) < 0.03 and abs(var - fixed_var) < 0.03, (mean, var, fixed_mean, fixed_var)


# ---- the rollout-worker hook and the learner, on the tiny random DDPM ----


def test_rollout_workers_add_adjoints_and_the_first_step_is_on_policy(tiny_model_dir):
    cfg = tiny_cfg(tiny_model_dir, "algo=adjoint_matching", "algo.passes_per_buffer=3", "algo.lr=1e-2",
                   "reward=digit")  # fmt: skip
    worker, learner = RolloutWorker(cfg), Learner(cfg, torch.device("cpu"))
    batch = worker.collect(0, seed=3, n=16)
    num_steps = cfg.env.num_inference_steps
    assert batch["adjoint"].shape == batch["base_mean"].shape == batch["noise"].shape == (16, num_steps, 1, 16, 16)
    # fine-tuned == base at version 0: the recorded transitions are the base means plus sigma times the noise
    sigma = learner.policy.schedule.std.reshape(1, -1, 1, 1, 1)
    torch.testing.assert_close(batch["latents"][:, 1:], batch["base_mean"] + sigma * batch["noise"])
    assert "adjoint" not in worker.evaluate(0, seed=1, n=8)  # evaluation skips the hook
    learner.ingest([("b0", batch)])
    first = am.train_step(learner.ctx, learner.buffer.contents()[:8], learner.algo, learner.state)
    assert first["am/ess_fraction"] == pytest.approx(1.0, abs=1e-5)  # u = 0 on both sides: all weights equal
    metrics = learner.update()
    assert metrics["am/passes"] == 3 and metrics["train/optimizer_steps"] == 3 * 2
    assert metrics["am/ess_fraction_last_pass"] < 1.0  # the policy has moved away from the one that sampled


def test_ess_below_the_threshold_ends_the_passes_early(tiny_model_dir):
    cfg = tiny_cfg(tiny_model_dir, "algo=adjoint_matching", "algo.passes_per_buffer=5", "algo.lr=3e-2",
                   "algo.refill_below_ess=0.9999999", "reward=digit")  # fmt: skip
    worker, learner = RolloutWorker(cfg), Learner(cfg, torch.device("cpu"))
    learner.ingest([("b0", worker.collect(0, seed=3, n=16))])
    assert learner.update()["am/passes"] < 5


def test_config_requires_the_memoryless_schedule():
    with pytest.raises(ConfigError, match=r"env.eta=1.0"):
        validate(compose(["algo=adjoint_matching", "env.eta=0.5"]))
    with pytest.raises(ConfigError, match="passes_per_buffer"):
        validate(compose(["algo=adjoint_matching", "algo.passes_per_buffer=0"]))
    validate(compose(["algo=adjoint_matching"]))


# ---- Stable Diffusion: the frozen base from the SD layout, the reward through the VAE, the guidance regimes ----
SD_OVERRIDES = ("env=sd15", "algo=adjoint_matching", "env.resolution=32", "env.guidance_scale=3.0",
                "env.num_inference_steps=4", "reward=python", "reward.function=tests.python_rewards:smooth",
                "reward.differentiable=true", "trainer.rollout_batch_size=4", "trainer.samples_per_epoch=8",
                "algo.minibatch_size=4", "eval.num_samples=4", "judge=none")  # fmt: skip


@pytest.fixture(scope="module")
def sd_worker(tiny_sd):
    """A rollout worker on the tiny SD folder and four trajectories it sampled (before the AM hook)."""
    cfg = tiny_cfg(tiny_sd, *SD_OVERRIDES)
    validate(cfg)
    worker = RolloutWorker(cfg)
    return worker, worker.collect(0, seed=5, n=4, postprocess=False)


def decoded_reward_gradient(tiny_sd, x_0: torch.Tensor) -> torch.Tensor:
    """d smooth(vae.decode(x_0 / scaling_factor)) / d x_0 by autograd, with the VAE loaded here from the folder."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd / "vae").eval()
    x_0 = x_0.detach().clone().requires_grad_(True)
    images = vae.decode(x_0 / vae.config.scaling_factor).sample
    (gradient,) = torch.autograd.grad(smooth_reward(images).sum(), x_0)
    return gradient


def test_sd_rollout_workers_keep_the_saved_unet_as_the_frozen_base_and_add_lean_adjoints(tiny_sd, sd_worker):
    from diffusers import UNet2DConditionModel

    cfg = tiny_cfg(tiny_sd, *SD_OVERRIDES)
    policy, env, _ = build_policy(cfg, CPU, "rollout")
    saved = UNet2DConditionModel.from_pretrained(tiny_sd / "unet").state_dict()
    reference = policy.reference_unet.state_dict()
    assert policy.reference_unet is not policy.unet and reference.keys() == saved.keys()
    assert all(torch.equal(reference[name], saved[name]) for name in saved)
    assert not any(p.requires_grad for p in policy.reference_unet.parameters())
    assert build_policy(cfg, CPU, "learner")[0].reference_unet is None  # AM needs the base in rollout workers only
    # the reference stays the base when the trained network moves
    x, context = torch.randn(2, *env.sample_shape), env.reset(seed=0)[0]["context"][:2]
    timestep = env.schedule.timesteps[1].expand(2)
    before = policy.reference_forward(x, timestep, context)
    with torch.no_grad():
        for parameter in policy.unet.parameters():
            parameter.add_(0.1)
    torch.testing.assert_close(policy.reference_forward(x, timestep, context), before, rtol=0, atol=0)

    worker, raw = sd_worker
    batch = am.postprocess_rollout(worker, raw.clone(), cfg.algo)
    steps = cfg.env.num_inference_steps
    assert batch["latents"].shape == (4, steps + 1, 4, 16, 16)  # 32 px images, 16 px latents
    assert batch["adjoint"].shape == batch["base_mean"].shape == (4, steps, 4, 16, 16)
    assert bool(batch["adjoint"].isfinite().all()) and bool((batch["adjoint"].flatten(2).abs().amax(2) > 0).all())


def test_sd_lean_adjoint_starts_at_the_reward_gradient_through_the_vae_decoder(tiny_sd, sd_worker):
    worker, raw = sd_worker
    batch = am.postprocess_rollout(worker, raw.clone(), worker.spec.algo)
    lam = worker.spec.algo.reward_multiplier
    expected = -lam * decoded_reward_gradient(tiny_sd, batch["latents"][:, -1])
    assert expected.abs().max() > 0
    torch.testing.assert_close(batch["adjoint"][:, -1], expected, rtol=1e-4, atol=1e-7)


def hand_guided_mean(policy, x: torch.Tensor, k: int, context: torch.Tensor, w: float) -> torch.Tensor:
    """The frozen base step's mean from x with guidance w, the guidance done here from two unguided predictions."""
    timestep = policy.schedule.timesteps[k].expand(len(x))
    conditional = policy.reference_forward(x, timestep, context, guidance_scale=1.0)
    null = policy.null_context.expand(len(x), *context.shape[1:])
    unconditional = policy.reference_forward(x, timestep, null, guidance_scale=1.0)
    eps = unconditional + w * (conditional - unconditional)
    return ddim_step(policy.schedule, k, eps, x, noise=torch.zeros_like(x)).mean


def hand_adjoints(tiny_sd, policy, batch: TensorDict, lam: float, w: float) -> torch.Tensor:
    """[B, T, ...] a_{k+1}: -lambda grad r(decode(x_0)), then one VJP through each guided base step, backwards."""
    latents, context = batch["latents"], batch["context"]
    adjoint = -lam * decoded_reward_gradient(tiny_sd, latents[:, -1])
    adjoints = []
    for k in reversed(range(latents.shape[1] - 1)):
        adjoints.insert(0, adjoint)
        x = latents[:, k].clone().requires_grad_(True)
        (adjoint,) = torch.autograd.grad(hand_guided_mean(policy, x, k, context, w), x, grad_outputs=adjoint)
    return torch.stack(adjoints, dim=1)


def hand_base_means(policy, batch: TensorDict, w: float) -> torch.Tensor:
    latents, context = batch["latents"], batch["context"]
    with torch.no_grad():
        return torch.stack([hand_guided_mean(policy, latents[:, k], k, context, w)
                            for k in range(latents.shape[1] - 1)], dim=1)  # fmt: skip


def test_sd_default_is_the_seeds_recommendation_guided_trajectories_unguided_adjoint_and_control(sd_worker):
    assert not am.Config().guidance_in_adjoint_computation and not am.Config().guidance_in_control_computation
    algo = compose(["algo=adjoint_matching", "env=sd15"]).algo
    assert not algo.guidance_in_adjoint_computation and not algo.guidance_in_control_computation
    # the trajectories themselves are sampled guided, with env.guidance_scale
    worker, raw = sd_worker
    policy, w = worker.policy, worker.spec.env.guidance_scale
    assert policy.guidance_scale == w == 3.0
    latents, noise, context = raw["latents"], raw["noise"], raw["context"]
    with torch.no_grad():
        for k in range(latents.shape[1] - 1):
            step = policy.step(latents[:, k], k, context, noise=noise[:, k], guidance_scale=w)
            torch.testing.assert_close(latents[:, k + 1], step.prev_sample, rtol=1e-4, atol=1e-5)
            unguided = policy.step(latents[:, k], k, context, noise=noise[:, k], guidance_scale=1.0)
            assert (latents[:, k + 1] - unguided.prev_sample).abs().max() > 1e-3


@pytest.mark.parametrize(("in_adjoint", "in_control"), [(False, False), (True, False), (True, True), (False, True)],
                         ids=["default", "guided_adjoint", "full_cfg", "guided_control"])  # fmt: skip
def test_sd_guidance_flags_choose_the_guided_base_for_the_adjoint_and_the_control(tiny_sd, sd_worker,
                                                                                  in_adjoint, in_control):  # fmt: skip
    worker, raw = sd_worker
    policy, w = worker.policy, worker.spec.env.guidance_scale
    cfg = dataclasses.replace(worker.spec.algo, guidance_in_adjoint_computation=in_adjoint,
                              guidance_in_control_computation=in_control)  # fmt: skip
    batch = am.postprocess_rollout(worker, raw.clone(), cfg)
    lam = cfg.reward_multiplier
    adjoints = {scale: hand_adjoints(tiny_sd, policy, raw, lam, scale) for scale in (1.0, w)}
    base_means = {scale: hand_base_means(policy, raw, scale) for scale in (1.0, w)}
    # the two candidates differ by far more than the tolerance, so matching one rules out the other
    assert (adjoints[w][:, 0] - adjoints[1.0][:, 0]).abs().max() > 100 * adjoints[1.0][:, 0].abs().max() * 1e-4
    assert (base_means[w] - base_means[1.0]).abs().max() > 1e-2
    torch.testing.assert_close(batch["adjoint"], adjoints[w if in_adjoint else 1.0], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(batch["base_mean"], base_means[w if in_control else 1.0], rtol=1e-4, atol=1e-5)


def test_one_am_update_on_sd_moves_the_unet(tiny_sd, sd_worker):
    cfg = tiny_cfg(tiny_sd, *SD_OVERRIDES, "algo.passes_per_buffer=1", "algo.lr=1e-3")
    worker, raw = sd_worker
    learner = Learner(cfg, CPU)
    before = {k: v.clone() for k, v in learner.policy.unet.state_dict().items()}
    learner.ingest([("b0", am.postprocess_rollout(worker, raw.clone(), cfg.algo))])
    metrics = learner.update()
    assert metrics["train/optimizer_steps"] == 1 and metrics["train/skipped_steps"] == 0
    assert math.isfinite(metrics["loss/adjoint_matching"]) and metrics["train/grad_norm"] > 0
    after = learner.policy.unet.state_dict()
    assert all(bool(v.isfinite().all()) for v in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in before)


# ---- non-finite rewards through whole epochs ----
@pytest.mark.parametrize("function", ["half_nan", "all_nan"])
def test_non_finite_rewards_through_whole_epochs_leave_the_weights_finite(tiny_model_dir, function):
    cfg = tiny_cfg(tiny_model_dir, "algo=adjoint_matching", "algo.passes_per_buffer=2", "algo.lr=1e-2",
                   "reward=python", f"reward.function=tests.python_rewards:{function}",
                   "reward.differentiable=true")  # fmt: skip
    validate(cfg)
    worker, learner = RolloutWorker(cfg), Learner(cfg, CPU)
    initial = learner.policy.trainable_state_dict()
    for epoch in range(2):
        batch = worker.collect(learner.policy_version, seed=epoch, n=16)
        finite = batch["reward_finite"]
        assert int((~finite).sum()) == 16 if function == "all_nan" else 0 < int((~finite).sum()) < 16
        # the hook differentiates finite rewards only; the others get zeros, which the learner drops with them
        assert bool(batch["adjoint"].isfinite().all()) and bool((batch["adjoint"][~finite] == 0).all())
        assert bool((batch["adjoint"][finite].flatten(1).abs().amax(1) > 0).all())
        added = learner.buffer.stats["added"]
        ingested = learner.ingest([(f"b{epoch}", batch)])
        assert ingested["reward/nonfinite"] == float((~finite).sum())
        assert learner.buffer.stats["added"] - added == int(finite.sum())  # the finite rows only
        metrics = learner.update()  # no error, even with nothing to train on
        weights = learner.policy.trainable_state_dict()
        assert all(bool(v.isfinite().all()) for v in weights.values())
        if function == "all_nan":  # an epoch with no finite reward is skipped
            assert metrics["train/skipped_epochs"] == 1.0 and metrics["train/optimizer_steps"] == 0.0
        else:
            assert metrics["train/skipped_epochs"] == 0.0 and metrics["train/optimizer_steps"] > 0
            assert metrics["train/skipped_steps"] == 0.0 and math.isfinite(metrics["loss/adjoint_matching"])
        worker.set_weights(weights, learner.policy_version)
    moved = any(not torch.equal(weights[k], initial[k]) for k in initial)
    assert moved == (function == "half_nan")
