"""DEFT: inverse-problem envs, the h-transform hook, the exact off-policy log-density ratio and, as the oracle,
posterior sampling on a Gaussian toy whose base model and posterior are known in closed form."""

import json
import math
from types import SimpleNamespace

import gymnasium
import pytest
import torch
from diffusers import DDPMScheduler
from gymnasium.utils.env_checker import check_env
from tensordict import TensorDict
from torch import nn

from rlft.algorithms import LearnerContext, deft
from rlft.buffer import TrajectoryBuffer
from rlft.core.sampler import ddim_step
from rlft.core.schedule import DDIMSchedule
from rlft.envs.denoising import DenoisingEnv
from rlft.envs.digits import load_digits
from rlft.envs.inverse import InverseProblemEnv, MeasurementCases, SuperResolution, make_operator
from rlft.envs.rewards import make_reward
from rlft.learner import Learner
from rlft.policy import DiffusionPolicy
from rlft.rollout import RolloutWorker
from tests.helpers import run_rlft, tiny_cfg

# ---- the Gaussian toy: data N(M, S^2) per pixel, so the exact noise prediction is known at every t ----
M, S, SIGMA_Y, SHAPE = 0.3, 0.5, 0.25, (1, 4, 4)
# clip_sample=False: the sampler honours the scheduler's clipping of x0_hat, which would make the steps non-affine
SCHEDULER_CONFIG = dict(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                      clip_sample=False).config)  # fmt: skip
INPAINT = make_operator("inpaint", hole_fraction=0.5)


def toy_reward_context(y: torch.Tensor) -> dict:
    """The measurement reward's keywords, as an inverse-problem env gives them: y, A and sigma_y."""
    return {"measurement": y, "operator": INPAINT, "sigma_y": SIGMA_Y}


class GaussianNoisePrediction(nn.Module):
    """eps*(x_t, t) = E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) M) / (a S^2 + 1 - a), the exact base model."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace()  # an unconditional "UNet" for DiffusionPolicy
        self.register_buffer("alphas", DDPMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod)
        self.unused = nn.Parameter(torch.zeros(1))  # frozen like any base network

    def forward(self, x_t, timestep):
        a = self.alphas[timestep].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(1 - a).sqrt() * (x_t - a.sqrt() * M) / (a * S**2 + 1 - a))


def toy_setup(num_steps: int, batch: int, cases: MeasurementCases | None = None, **cfg_kwargs):
    """Inpainting of the central 2x2 of a 4x4 Gaussian 'image' with noise SIGMA_Y; one fixed measurement y."""
    operator = INPAINT
    generator = torch.Generator().manual_seed(0)
    truth = M + S * torch.randn((1, *SHAPE), generator=generator)
    y = operator(truth + SIGMA_Y * torch.randn((1, *SHAPE), generator=generator))
    schedule = DDIMSchedule.from_scheduler_config(SCHEDULER_CONFIG, num_steps, eta=1.0)
    reward = make_reward("measurement")  # A and sigma_y come with y from the env (its reward context)
    if cases is None:
        env = DenoisingEnv(batch, SHAPE, schedule, reward, context_sampler=lambda n, g: y.expand(n, *SHAPE).clone(),
                           context_shape=SHAPE, reward_context=toy_reward_context)  # fmt: skip
    else:
        env = InverseProblemEnv(batch, SHAPE, schedule, reward, operator=operator, sigma_y=SIGMA_Y, cases=cases)
    cfg = deft.Config(**{"hnet_channels": [], "lr": 1e-2, **cfg_kwargs})
    torch.manual_seed(0)
    policy = DiffusionPolicy(GaussianNoisePrediction(), schedule, correction=deft.make_correction(cfg, env))
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    ctx = LearnerContext(policy, policy, optimizer, env, None, torch.Generator().manual_seed(1), torch.device("cpu"))
    # closed-form posterior per pixel: observed pixels combine the base sampler's own Gaussian marginal N(m_b, v_b)
    # with the measurement; the hole keeps the base marginal. (DEFT tilts the base sampler's path measure, so its
    # target is this discretised prior times the likelihood; m_b, v_b -> M, S^2 as the steps get finer.)
    # With a likelihood weight lambda the target is the posterior of a measurement of noise SIGMA_Y / sqrt(lambda).
    base_mean, base_variance = discretised_base_marginal(policy)
    observed = operator.mask(truth)[0] > 0
    noise_variance = SIGMA_Y**2 / cfg.likelihood_weight
    variance = torch.where(observed, 1 / (1 / base_variance + 1 / noise_variance), base_variance)
    mean = torch.where(observed, variance * (base_mean / base_variance + y[0] / noise_variance), base_mean)
    return ctx, cfg, y, mean, variance


def discretised_base_marginal(policy: DiffusionPolicy) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of x_0 under the base sampler: every DDIM step is affine in x plus Gaussian noise."""
    mean, variance = torch.tensor(0.0), torch.tensor(1.0)  # x_T ~ N(0, 1)
    schedule = policy.schedule
    for k in range(schedule.num_steps):
        points = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
        eps = policy.base_forward(points, schedule.timesteps[k].expand(2), None)
        step = ddim_step(schedule, k, eps, points, noise=torch.zeros_like(points))
        slope, offset = (step.mean[1] - step.mean[0]).item(), step.mean[0].item()
        mean, variance = slope * mean + offset, slope**2 * variance + step.std[0].item() ** 2
    return mean, variance


@torch.no_grad()
def sample(policy: DiffusionPolicy, y: torch.Tensor, batch: int, seed: int) -> TensorDict:
    """Trajectories as rollout workers record them (latents, step noises, base predictions, reward)."""
    schedule, generator = policy.schedule, torch.Generator().manual_seed(seed)
    x, context = torch.randn((batch, *SHAPE), generator=generator), y.expand(batch, *SHAPE).clone()
    latents, noises, bases = [x], [], []
    for k in range(schedule.num_steps):
        base = policy.base_forward(x, schedule.timesteps[k].expand(batch), context).float()
        noise = torch.randn(x.shape, generator=generator)
        x = policy.step(x, k, context, noise=noise, base_output=base).prev_sample
        latents.append(x), noises.append(noise), bases.append(base)
    reward = make_reward("measurement")(x, **toy_reward_context(context))
    return TensorDict({"latents": torch.stack(latents, 1), "noise": torch.stack(noises, 1),
                       "base_output": torch.stack(bases, 1), "context": context, "reward": reward}, batch_size=[batch])


def check_posterior(policy, y, mean, variance, mean_tolerance, std_ratio_range):
    x0 = torch.cat([sample(policy, y, 512, 1000 + i)["latents"][:, -1] for i in range(4)])  # 2,048 samples
    mean_error = (x0.mean(0) - mean).abs().max().item()
    std_ratio = (x0.var(0) / variance).sqrt()
    assert mean_error < mean_tolerance, f"posterior mean off by {mean_error:.3f}"
    low, high = std_ratio_range
    assert low < std_ratio.min().item() and std_ratio.max().item() < high, f"std ratios {std_ratio.flatten()}"


def test_log_variance_deft_samples_the_gaussian_posterior():
    """VarGrad on the exact Gaussian base model moves samples from the prior to the closed-form posterior.

    The target is the base sampler's own (discretised) Gaussian marginal times the likelihood. Tolerance: the
    posterior mean within 0.06 per pixel (the base sampler is ~0.8 off; 2,048 samples give a standard error of
    ~0.005; measured 0.03) and the per-pixel std within [0.9, 1.2] times the exact one (the prior's is ~2x in
    observed pixels; measured 1.02-1.12: a control that only shifts the mean of each of 20 steps cannot shrink
    the variance quite as much as the exact tilt).
    """
    ctx, cfg, y, mean, variance = toy_setup(num_steps=20, batch=256)
    before = sample(ctx.policy, y, 512, 999)["latents"][:, -1]
    assert (before.mean(0) - mean).abs().max() > 0.5  # the base model alone ignores y
    for iteration in range(100):
        metrics = deft.log_variance_step(ctx, sample(ctx.policy, y, 256, iteration), cfg)
    assert metrics["loss/log_variance"] < 5.0  # from ~300 at the start: L is nearly constant over samples
    check_posterior(ctx.policy, y, mean, variance, mean_tolerance=0.06, std_ratio_range=(0.9, 1.2))


def test_log_variance_deft_with_a_likelihood_weight_samples_the_sharpened_posterior():
    """likelihood_weight = 4 targets p(x_0) p(y | x_0)^4: the posterior of a measurement with half the noise, whose
    observed pixels have 0.54x the std of the lambda = 1 posterior (so samples of that one would fail here with std
    ratios near 2). Mean within 0.06 (measured 0.03); std within [0.9, 1.3] of the exact one (measured 1.00-1.21:
    the 20-step sampler falls a little further short of the sharper tilt than at lambda = 1)."""
    ctx, cfg, y, mean, variance = toy_setup(num_steps=20, batch=256, likelihood_weight=4.0)
    for iteration in range(100):
        deft.log_variance_step(ctx, sample(ctx.policy, y, 256, iteration), cfg)
    check_posterior(ctx.policy, y, mean, variance, mean_tolerance=0.06, std_ratio_range=(0.9, 1.3))


def test_supervised_deft_samples_the_gaussian_posterior():
    """Conditional score matching on pairs (x, y = A(x) + noise) from the prior learns the same posterior.

    Its target is the continuous-time conditional score, not the tilt of the 20-step sampler, so it sits a little
    further from the discretised target: mean within 0.1 (measured 0.06), std within [0.7, 1.15] (measured
    0.77-1.02; the coarse sampler contracts the observed pixels a bit too much).
    """
    operator = make_operator("inpaint", hole_fraction=0.5)
    prior = M + S * torch.randn((4096, *SHAPE), generator=torch.Generator().manual_seed(5))
    cases = MeasurementCases.make(prior, operator, SIGMA_Y, noise_seed=6)
    ctx, cfg, y, mean, variance = toy_setup(num_steps=20, batch=256, cases=cases, variant="supervised",
                                            supervised_batch_size=512)  # fmt: skip
    state = deft.make_state(cfg)
    for _ in range(300):
        deft.supervised_step(ctx, cfg, state)
    check_posterior(ctx.policy, y, mean, variance, mean_tolerance=0.1, std_ratio_range=(0.7, 1.15))


def test_supervised_deft_on_the_base_models_own_samples_needs_no_ground_truth():
    """pairs="base": score matching on the base sampler's samples, measured anew, with no ground truth in sight.

    The env's cases are never read (they are NaN here). The pool matches the base sampler's marginal, and the target
    is its posterior, the same as log-variance's (the one toy_setup computes), so the mean lands closer than with
    data pairs: within 0.05 (measured 0.034; data pairs: 0.061); std within [0.75, 1.15] (measured 0.83-1.02).
    """
    unusable = MeasurementCases(torch.full((8, *SHAPE), float("nan")), torch.full((8, *SHAPE), float("nan")))
    ctx, cfg, y, mean, variance = toy_setup(num_steps=20, batch=256, cases=unusable, variant="supervised",
                                            supervised_batch_size=512, pairs="base")  # fmt: skip
    state = deft.make_state(cfg)
    for _ in range(300):
        deft.supervised_step(ctx, cfg, state)
    pool = state["base_samples"]
    assert pool.shape == (cfg.base_samples, *SHAPE) and bool(pool.isfinite().all())
    base_mean, base_variance = discretised_base_marginal(ctx.policy)
    assert abs(pool.mean().item() - base_mean) < 0.03 and abs(pool.var().item() / base_variance - 1) < 0.1
    check_posterior(ctx.policy, y, mean, variance, mean_tolerance=0.05, std_ratio_range=(0.75, 1.15))


def test_log_density_ratio_is_exact_for_stale_trajectories():
    """L's path term equals sum_k log N(x_k+1; mean^h) - log N(x_k+1; mean^base) on a path that another h made."""
    ctx, cfg, y, _, _ = toy_setup(num_steps=6, batch=8)
    scales = ctx.policy.correction.guidance_scale
    with torch.no_grad():
        scales.copy_(torch.linspace(-0.05, 0.02, len(scales)))
    batch = sample(ctx.policy, y, 8, seed=3)  # the behaviour policy
    with torch.no_grad():
        scales.copy_(torch.linspace(0.03, -0.08, len(scales)))  # the current policy differs
    control, behaviour, noise = deft.controls(ctx, batch, train_steps=set())
    _, info = deft.log_variance_loss(control, behaviour, noise, batch["reward"])
    expected = torch.zeros(8)
    dims = torch.tensor(SHAPE).prod()
    for k in ctx.policy.schedule.stochastic_steps.tolist():
        x_t, x_next, base = batch["latents"][:, k], batch["latents"][:, k + 1], batch["base_output"][:, k]
        with torch.no_grad():
            fine = ctx.policy.step(x_t, k, batch["context"], prev_sample=x_next, base_output=base).log_prob
            plain = ddim_step(ctx.policy.schedule, k, base, x_t, prev_sample=x_next)
        expected += (fine - plain.log_prob) * dims  # log_prob is a mean over dimensions
    torch.testing.assert_close(info["log_rnd"], expected, rtol=1e-4, atol=1e-4)


def test_loss_drops_huge_samples_and_its_gradient_is_the_variance_gradient():
    control = torch.randn(5, 3, 4, requires_grad=True)
    behaviour, noise = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    log_likelihood = torch.tensor([-1.0, -2.0, -3.0, -1e6, -0.5])  # sample 3 has a huge L = log_rnd + 1e6
    loss, info = deft.log_variance_loss(control, behaviour, noise, log_likelihood, loss_threshold=1e3)
    assert info["kept"].tolist() == [True, True, True, False, True]
    log_rnd = (-0.5 * control**2 + behaviour * control + control * noise).sum(dim=(1, 2))
    objective = log_rnd - log_likelihood
    torch.testing.assert_close(loss, objective[[0, 1, 2, 4]].var())
    loss.backward()
    assert control.grad[3].abs().sum() == 0  # a dropped sample gives no gradient


def test_loss_is_the_variance_within_each_measurement_pooled():
    """Paths of several measurements: L is compared only with paths of the same y (-log Z(y) differs across y)."""
    control = torch.randn(7, 3, 4, requires_grad=True)
    behaviour, noise = torch.randn(7, 3, 4), torch.randn(7, 3, 4)
    log_likelihood = torch.tensor([-1.0, -2.0, -30.0, -31.0, -33.0, -1e6, -60.0])  # the last is alone in its group
    groups = torch.tensor([0, 0, 4, 4, 4, 4, 9])
    loss, info = deft.log_variance_loss(control, behaviour, noise, log_likelihood, 1e3, groups)
    objective = info["objective"]
    first, second = objective[:2], objective[2:5]  # sample 5 is dropped, sample 6 has no partner
    expected = ((first - first.mean()).pow(2).sum() + (second - second.mean()).pow(2).sum()) / (5 - 2)
    torch.testing.assert_close(loss, expected)
    shifted, _ = deft.log_variance_loss(control, behaviour, noise, log_likelihood - 10 * groups, 1e3, groups)
    torch.testing.assert_close(shifted, loss)  # a constant per measurement (log Z(y)) leaves the loss unchanged
    loss.backward()
    assert control.grad[6].abs().sum() == 0


def test_measurement_minibatches_keep_each_measurements_samples_together():
    cases = MeasurementCases.make(torch.randn(50, 1, 4, 4), make_operator("sr", 2), 0.1, noise_seed=0)
    contexts = cases.sample(12, torch.Generator().manual_seed(0), repeats=4)
    assert all(torch.equal(contexts[i], contexts[i - i % 4]) for i in range(12))
    assert not torch.equal(contexts[0], contexts[4])
    buffer = TrajectoryBuffer(capacity=12, minibatch_size=4, max_staleness=0)
    buffer.add("batch", TensorDict({"context": contexts, "index": torch.arange(12),
                                    "policy_version": torch.zeros(12)}, [12]))  # fmt: skip
    ctx = LearnerContext(None, None, None, None, buffer, torch.Generator().manual_seed(1), torch.device("cpu"))
    minibatches = list(deft.measurement_minibatches(ctx, 4))
    assert sorted(torch.cat([mb["index"] for mb in minibatches]).tolist()) == list(range(12))
    assert all(len(deft.measurement_groups(mb).unique()) == 1 for mb in minibatches)


# ---- the inverse-problem envs ----
def test_operators_and_the_measurement_reward_gradient():
    x = torch.randn(3, 1, 16, 16, requires_grad=True)
    sr = SuperResolution(4)
    torch.testing.assert_close(sr(x)[0, 0, 1, 2], x[0, 0, 4:8, 8:12].mean())
    y = torch.randn(3, 1, 4, 4)
    reward = make_reward("measurement")
    (gradient,) = torch.autograd.grad(reward(x, measurement=y, operator=sr, sigma_y=0.1).sum(), x)
    # grad of -|A x - y|^2 / (2 sigma^2) is -A^T (A x - y) / sigma^2, and A^T spreads each value / 16 over its block
    expected = -sr.show(sr(x) - y) / 16 / 0.1**2
    torch.testing.assert_close(gradient, expected.detach())
    inpaint = make_operator("inpaint", hole_fraction=0.5)
    assert inpaint(torch.ones(1, 1, 16, 16)).sum() == 256 - 64  # the central 8x8 is hidden


def test_digits_sr_env_trains_on_train_measurements_and_evaluates_on_held_out_digits():
    env = gymnasium.make_vec("rlft/DigitsSR-v0", 4, vectorization_mode="vector_entry_point", num_inference_steps=2)
    obs, _ = env.reset(seed=0)
    assert obs["context"].shape == (4, 1, 4, 4)
    train_images = load_digits("train")[0]
    truth = env.cases.ground_truth(obs["context"])
    assert all(any(torch.equal(t, s) for s in train_images) for t in truth)
    evaluation = gymnasium.make_vec("rlft/DigitsSR-v0", 12, vectorization_mode="vector_entry_point",
                                    num_inference_steps=2, evaluation=True)  # fmt: skip
    first, _ = evaluation.reset(seed=1)
    again, _ = evaluation.reset(seed=2)
    torch.testing.assert_close(first["context"], again["context"])  # fixed evaluation cases
    # a later batch continues with the next cases: samples 12..23 are cases 2 and 3, six samples each
    second, _ = evaluation.reset(seed=3, options={"batch_index": 1})
    torch.testing.assert_close(second["context"], evaluation.cases.measurements[torch.arange(12, 24) // 6])
    held_out = evaluation.cases.ground_truth(first["context"])
    assert not any(torch.equal(h, s) for h in held_out for s in train_images)
    # the ground truth is measurement-consistent up to the noise: RMS of A(x) - y near sigma_y = 0.05
    described = evaluation.describe(held_out, first["context"])
    assert 0.02 < described["ground_truth_measurement_error"] < 0.08 and described["psnr"] > 60
    assert described["panel"].shape == (2 * 8, 1, 16, 16)  # per case: measurement, 6 samples, ground truth
    assert described["sample_spread"] == 0 and described["psnr_of_case_mean"] > 60  # six copies of the truth
    # two samples at truth +- d (d inside [-1, 1]'s margins): the case mean is the truth, the spread (the sample std,
    # n - 1 in the denominator) is sqrt(2) RMS(d), and each sample's PSNR is 10 log10(4 / mean(d^2))
    d = 0.2 * (1 - held_out[:1].abs())
    pair = torch.cat([held_out[:1] + d, held_out[:1] - d])
    described = evaluation.describe(pair, first["context"][:1].repeat(2, 1, 1, 1))
    mean_square = d.pow(2).mean()
    torch.testing.assert_close(described["sample_spread"], (2 * mean_square).sqrt().item(), rtol=1e-4, atol=0)
    torch.testing.assert_close(described["psnr"], (10 * torch.log10(4 / mean_square)).item(), rtol=1e-4, atol=0)
    assert described["psnr_of_case_mean"] > 60
    check_env(gymnasium.make("rlft/DigitsInpaint-v0", num_inference_steps=2).unwrapped)


def test_guidance_init_starts_s_t_at_the_analytic_estimate():
    env = gymnasium.make_vec("rlft/DigitsSR-v0", 2, vectorization_mode="vector_entry_point", num_inference_steps=10)
    estimate = deft.guidance_estimate(env)
    a = env.schedule.alpha_prod.cpu()
    r = (1 - a) / a  # kappa = 1/16: a 4x4 block mean of white noise
    expected = -r.sqrt() * 0.05**2 / (0.05**2 + r / 16)
    last = env.schedule.stochastic_steps[-1].item()
    torch.testing.assert_close(estimate[:last], expected[:last].float(), rtol=0.1, atol=1e-4)
    assert (estimate[last:] == 0).all()  # the last stochastic step (tiny noise) and the deterministic one
    for init in (0.0, 0.5):
        correction = deft.make_correction(deft.Config(guidance_init=init), env)
        # a reparameterisation of the starting point only: h = s_t output_scale_t g starts at init * estimate_t g
        torch.testing.assert_close(correction.guidance_scale * correction.output_scale, init * estimate)
    assert (deft.guidance_estimate(SimpleNamespace(schedule=env.schedule)) == 0).all()  # no operator: no estimate
    # a likelihood weight lambda is a measurement of noise sigma_y / sqrt(lambda)
    sharper = -r.sqrt() * 0.025**2 / (0.025**2 + r / 16)
    torch.testing.assert_close(deft.guidance_estimate(env, 4.0)[:last], sharper[:last].float(), rtol=0.1, atol=1e-4)


def test_the_learning_rate_defaults_per_variant_and_a_bad_variant_is_named():
    from rlft.config import ConfigError, compose

    assert deft.Config().lr == deft.DEFAULT_LR["log_variance"]
    assert deft.Config(variant="supervised").lr == deft.DEFAULT_LR["supervised"]
    assert deft.Config(variant="supervised", lr=5e-4).lr == 5e-4  # an explicit algo.lr wins
    assert compose(["algo=deft", "algo.variant=supervised"]).algo.lr == deft.DEFAULT_LR["supervised"]
    with pytest.raises(ValueError, match="algo.variant=sm is not one of log_variance, supervised"):
        deft.Config(variant="sm")
    with pytest.raises(ConfigError, match="algo.variant=sm is out of range: algo.variant takes one of log_v"):
        compose(["algo=deft", "algo.variant=sm"])
    # ranges are the knobs' own (rlft.core.spec), checked when the spec is composed
    with pytest.raises(ConfigError, match=r"algo.likelihood_weight=0.0 is out of range: .* takes a number > 0"):
        compose(["algo=deft", "algo.likelihood_weight=0"])
    with pytest.raises(ValueError, match="applies to the log_variance variant"):
        deft.Config(variant="supervised", likelihood_weight=2.0)
    with pytest.raises(ConfigError, match="algo.pairs=real is out of range: algo.pairs takes one of data, base"):
        compose(["algo=deft", "algo.variant=supervised", "algo.pairs=real"])
    with pytest.raises(ValueError, match="add algo.variant=supervised"):
        deft.Config(pairs="base")


# ---- the policy hook and the learner loop ----
def test_h_net_with_guidance_init_0_starts_at_the_base_model_and_only_it_is_published(tiny_model_dir):
    cfg = tiny_cfg(tiny_model_dir, "algo=deft", "env=digits_sr", "algo.minibatch_size=8", "algo.guidance_init=0")
    learner = Learner(cfg, torch.device("cpu"))
    weights = learner.policy.trainable_state_dict()
    assert weights and all(name.startswith("correction.") for name in weights)
    base = sum(p.numel() for p in learner.policy.unet.parameters())
    assert all(not p.requires_grad for p in learner.policy.unet.parameters())
    worker = RolloutWorker(cfg)
    worker.set_weights(weights, 0)
    batch = worker.collect(0, seed=3, n=8)
    assert {"noise", "base_output"} <= set(batch.keys())
    # h = 0 at the start: every step's mean is the base model's, so x_k+1 - mean_base = std * noise exactly
    schedule = worker.policy.schedule
    for k in schedule.stochastic_steps.tolist():
        base_only = lambda x, t, c, b=None, w=None: worker.policy.base_forward(x, t, c)  # noqa: E731
        out = worker.policy.step(batch["latents"][:, k], k, batch["context"], noise=batch["noise"][:, k],
                                 network=base_only)  # fmt: skip
        torch.testing.assert_close(out.prev_sample, batch["latents"][:, k + 1], rtol=1e-5, atol=1e-5)
    learner.ingest([("b0", batch)])
    first = deft.log_variance_step(learner.ctx, batch, learner.algo)
    assert first["deft/buffer_ess_fraction"] == pytest.approx(1.0)  # on-policy: every importance weight is 1
    metrics = learner.update()
    assert metrics["train/optimizer_steps"] == 2.0 and metrics["deft/buffer_ess_fraction"] < 1.0  # now stale
    moved = learner.policy.trainable_state_dict()
    assert any(not torch.equal(moved[k], weights[k]) for k in weights)
    assert base > 0


def test_deft_runs_end_to_end_in_one_process(tiny_model_dir, tmp_path):
    from rlft.run import main

    for variant, pairs in (("log_variance", "data"), ("supervised", "data"), ("supervised", "base")):
        run_dir = main([f"env.base_model={tiny_model_dir}", "algo=deft", "env=digits_sr", f"algo.variant={variant}",
                        f"algo.pairs={pairs}", "algo.base_samples=16", "env.num_inference_steps=3",
                        "trainer.rollout_batch_size=8", "trainer.samples_per_epoch=16", "algo.minibatch_size=8",
                        "algo.supervised_steps=2", "eval.num_samples=16", "trainer.epochs=2",
                        "trainer.max_staleness=1", "ray.enabled=false", "ray.rollout_threads=1",
                        "ray.learner_threads=1", "logging.wandb=disabled", "logging.progress=false",
                        f"logging.run_dir={tmp_path / f'{variant}_{pairs}'}"])  # fmt: skip
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert any('"eval/psnr"' in line and '"eval/measurement_error"' in line for line in lines)
        assert (run_dir / "samples" / "epoch_0002.png").exists() and (run_dir / "final" / "policy.safetensors").exists()


def test_config_composes_the_measurement_reward():
    from rlft.config import ConfigError, compose, validate

    cfg = compose(["algo=deft", "env=digits_sr"])
    validate(cfg)
    assert cfg.reward.name == "measurement"  # the env's own reward
    # which takes the env's noise level with each measurement (the env's reward context), so the two always agree
    env = cfg.env.make_env(cfg.reward.build(), 2)
    observation, _ = env.reset(seed=0)
    assert env.reward_context(observation["context"])["sigma_y"] == cfg.env.sigma_y
    assert compose(["env=digits_inpaint", "reward=digit"]).reward.name == "digit"  # unless told otherwise
    with pytest.raises(ConfigError, match="env=flowers102_sr needs a base model: set env.base_model="):
        validate(compose(["algo=deft", "env=flowers102_sr"]))


@pytest.mark.slow
def test_deft_through_real_ray_with_a_stale_buffer(tiny_model_dir, tmp_path):
    """`python -m rlft.run algo=deft env=digits_sr` through Ray actors and a Ray Train learner, reusing stale data."""

    run_dir = tmp_path / "run"
    run_rlft("algo=deft", "env=digits_sr", f"env.base_model={tiny_model_dir}", f"logging.run_dir={run_dir}",
             "trainer.epochs=2", "ray.num_cpus=4", "env.num_inference_steps=3", "trainer.rollout_batch_size=8",
             "trainer.samples_per_epoch=16", "trainer.buffer_capacity=32", "trainer.max_staleness=1",
             "algo.minibatch_size=8", "eval.num_samples=16", "eval.every=1", "ray.rollout_threads=1",
             "ray.learner_threads=1", "logging.wandb=disabled")  # fmt: skip
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "loss/log_variance" in m]
    assert [m["buffer/size"] for m in train] == [16.0, 32.0]  # the second epoch also trains on the first's paths
    assert all("eval/psnr" in m for m in lines if "eval/reward_mean" in m)


def test_deft_refuses_stable_diffusion_at_validation():
    from rlft.config import ConfigError, compose, validate

    differentiable = ["reward=python", "reward.function=tests.python_rewards:smooth", "reward.differentiable=true"]
    with pytest.raises(ConfigError, match=r"algo=deft .*env=sd15 is a latent text-to-image model"):
        validate(compose(["algo=deft", "env=sd15", *differentiable]))
    with pytest.raises(ConfigError, match="algo=deft"):  # with SD's own reward too
        validate(compose(["algo=deft", "env=sd15"]))


@pytest.mark.parametrize("function", ["nan_every_other_row", "half_nan"])
def test_non_finite_rewards_through_a_log_variance_update_leave_the_weights_finite(tiny_model_dir, function):
    """Some rewards are NaN (rows 0, 2, ... of every call; or decided by each image, which also makes the h-net's
    likelihood gradient g of those x0_hat zero): they are counted and dropped, the rest trains, nothing turns NaN."""
    from rlft.config import validate

    cfg = tiny_cfg(tiny_model_dir, "algo=deft", "reward=python", f"reward.function=tests.python_rewards:{function}",
                   "reward.differentiable=true", "algo.lr=1e-2")  # fmt: skip
    validate(cfg)  # a differentiable reward, as DEFT needs
    learner = Learner(cfg, torch.device("cpu"))
    worker = RolloutWorker(cfg)
    initial = learner.policy.trainable_state_dict()
    worker.set_weights(initial, 0)
    batch = worker.collect(0, seed=3, n=16)
    nonfinite = int((~batch["reward_finite"]).sum())
    assert (nonfinite == 8 if function == "nan_every_other_row" else 0 < nonfinite < 16)
    assert bool(batch["latents"].isfinite().all()) and bool(batch["base_output"].isfinite().all())
    ingested = learner.ingest([("b0", batch)])
    assert ingested["reward/nonfinite"] == float(nonfinite) and len(learner.buffer) == 16 - nonfinite
    metrics = learner.update()
    assert metrics["train/skipped_epochs"] == 0.0 and metrics["train/optimizer_steps"] > 0
    assert math.isfinite(metrics["loss/log_variance"]) and metrics["train/skipped_steps"] == 0.0
    weights = learner.policy.trainable_state_dict()
    assert all(bool(v.isfinite().all()) for v in weights.values())
    assert any(not torch.equal(weights[k], initial[k]) for k in initial)
