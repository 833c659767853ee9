"""Adjoint Matching: lean adjoint == autograd, the tilted-Gaussian optimum on a toy, CFG regimes, the worker hook."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from rlft.algorithms import LearnerContext
from rlft.algorithms import adjoint_matching as am
from rlft.envs.schedule import DDIMSchedule
from tensordict import TensorDict
from torch import nn

from rlft.buffer import TrajectoryBuffer
from rlft.config import ConfigError, compose, validate
from rlft.learner import Learner
from rlft.policy import DiffusionPolicy
from rlft.rollout import RolloutWorker
from tests.helpers import tiny_cfg


def smooth_reward(images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A non-quadratic differentiable reward, so the chain's Jacobians all matter."""
    flat = images.flatten(1)
    return -((flat - 0.3) ** 2).mean(1) + torch.sin(2 * flat).mean(1)


def tiny_conditional_policy(schedule: DDIMSchedule) -> DiffusionPolicy:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    )  # fmt: skip
    return DiffusionPolicy(unet, schedule).eval()


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
        chain.append(am.guided_step(policy, schedule, chain[-1], k, context, guidance_scale).mean)
    expected = torch.autograd.grad((lam * smooth_reward(chain[-1], context)).sum(), chain[1:])
    latents = torch.stack([c.detach() for c in chain], dim=1)  # [B, T+1, 1, 8, 8]
    adjoint, base_mean = am.lean_adjoint(policy, latents, context, smooth_reward, lam, guidance_scale)
    for k in range(schedule.num_steps):  # adjoint[:, k] is a at latents[:, k+1]
        torch.testing.assert_close(adjoint[:, k], -expected[k], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(base_mean, latents[:, 1:])
    assert adjoint[:, 0].abs().max() > 0


def test_guided_step_is_classifier_free_guidance_of_the_two_predictions():
    schedule = ddim_schedule(4)
    policy = tiny_conditional_policy(schedule)
    torch.manual_seed(2)
    x, context, w, k = torch.randn(2, 1, 8, 8), torch.randn(2, 2, 8), 2.5, 1
    with torch.no_grad():
        timestep = schedule.timesteps[k].expand(2)
        eps_cond, eps_null = policy(x, timestep, context), policy(x, timestep, torch.zeros_like(context))
        guided = am.guided_step(policy, schedule, x, k, context, w)
        plain = am.guided_step(policy, schedule, x, k, context, 1.0)
    expected = am.ddim_step(eps_null + w * (eps_cond - eps_null), x, schedule.alpha_prod[k],
                            schedule.alpha_prod_prev[k], 1.0, noise=torch.zeros_like(x))  # fmt: skip
    torch.testing.assert_close(guided.mean, expected.mean, rtol=1e-4, atol=1e-5)
    assert (guided.mean - plain.mean).abs().max() > 1e-4
    torch.testing.assert_close(guided.std, schedule.std[k].expand(2).reshape(2, 1, 1, 1))


def test_guidance_regimes_change_the_adjoint_and_the_control_and_train():
    schedule = ddim_schedule(4)
    base = tiny_conditional_policy(schedule).requires_grad_(False)
    torch.manual_seed(3)
    batch = TensorDict({"latents": torch.randn(4, 5, 1, 8, 8), "context": torch.randn(4, 2, 8),
                        "noise": torch.randn(4, 4, 1, 8, 8), "reward": torch.zeros(4)}, batch_size=[4])  # fmt: skip

    def prepared(**flags):
        cfg = am.Config(guidance_scale=4.0, reward_multiplier=5.0, minibatch_size=4, **flags)
        return cfg, am.add_lean_adjoints(batch.clone(), base, smooth_reward, cfg)

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
    policy = copy.deepcopy(base).requires_grad_(True).train()
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
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
        at_zero, at_one = (am.guided_step(base, base.schedule, torch.tensor([[v]]), k, torch.zeros(1, 0)).mean.item()
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


def test_gaussian_toy_reaches_the_closed_form_tilted_gaussian():
    """Data N(0, 1), exact base model, r(x) = -(x - 2)^2 / 2, lambda = 1, 10 memoryless DDIM steps.

    Oracle 1, the continuous-time optimum: the base sampler's own final marginal N(mu_b, v_b) (closed form: every
    step is affine) tilted by exp(lambda r): v* = 1 / (1 / v_b + lambda), mu* = v* (mu_b / v_b + lambda y).
    Tolerance: 0.04 on the mean and 0.07 on the variance, which covers the O(step) discretisation gap (the
    controlled sampler keeps each step's noise sigma_k, where the exact tilt also narrows it; 0.036 at 10 steps).
    Oracle 2, the exact fixed point of the discretised AM regression (`discrete_am_fixed_point`): 0.03 on both.
    The base is far from both: mean 0 (vs ~0.71), variance ~0.55 (vs ~0.35-0.39).
    """
    torch.manual_seed(0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    schedule = DDIMSchedule.from_scheduler_config(dict(scheduler.config), 10, eta=1.0)
    base = DiffusionPolicy(GaussianToyNetwork(scheduler.alphas_cumprod, 0.0, 1.0), schedule).requires_grad_(False)
    policy = copy.deepcopy(base).requires_grad_(True)
    target, lam = 2.0, 1.0

    def reward(x, context):
        return -0.5 * ((x - target) ** 2).sum(1)

    slopes, offsets, variances = affine_steps(base)
    base_mean, base_var = 0.0, 1.0
    for a, c, v in zip(slopes, offsets, variances, strict=True):
        base_mean, base_var = a * base_mean + c, a**2 * base_var + v
    tilted_var = 1 / (1 / base_var + lam)
    tilted_mean = tilted_var * (base_mean / base_var + lam * target)
    fixed_mean, fixed_var = discrete_am_fixed_point(base, lam, target)

    cfg = am.Config(lr=1e-2, minibatch_size=256, reward_multiplier=lam, num_train_timesteps=9, passes_per_buffer=4)
    buffer = TrajectoryBuffer(1024, cfg.minibatch_size, max_staleness=0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(0)
    ctx = LearnerContext(policy, policy, optimizer, None, buffer, generator, torch.device("cpu"))
    state = am.make_state(cfg)
    for _ in range(20):  # buffered AM: a fresh buffer of 1024 trajectories, 4 passes over it
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
    num_steps = cfg["env"]["num_inference_steps"]
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
        validate(compose("config", ["algo=adjoint_matching", "env.eta=0.5"]))
    with pytest.raises(ConfigError, match="passes_per_buffer"):
        validate(compose("config", ["algo=adjoint_matching", "algo.passes_per_buffer=0"]))
    validate(compose("config", ["algo=adjoint_matching"]))
