"""The flow-matching sampler (rlft.core.flow) against closed forms: Gaussian data, whose exact velocity field is affine,
so every marginal of the rectified-flow path is known; torch.distributions; diffusers' flow-matching scheduler."""

import math

import pytest
import torch

from rlft.core.flow import (
    MEMORYLESS_NOISE_SCALE,
    FlowSchedule,
    flow_step,
    noised_sample,
    predict,
    transition_kl,
)

# Gaussian data x_0 ~ N(M, S^2), one (mean, std) per dimension
M = torch.tensor([1.5, -1.0, 0.0, 0.5], dtype=torch.float64)
S = torch.tensor([0.5, 1.0, 2.0, 0.7], dtype=torch.float64)
Z = 5.0  # tolerance in standard errors of the sample moments
# the path tests: the samplers are first order, and at this K their bias is below one standard error of N samples
N, K = 4096, 500


pytestmark = pytest.mark.usefixtures("one_thread")  # hundreds of small steps: one thread beats two contending ones


def marginal(t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of x_t = (1 - t) x_0 + t e with x_0 ~ N(M, S^2), e ~ N(0, 1) independent."""
    return (1 - t) * M, (1 - t) ** 2 * S**2 + t**2


def exact_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    """v*(x, t) = E[e - x_0 | x_t = x]. (e - x_0, x_t) is jointly Gaussian with E[e - x_0] = -M, E[x_t] = (1 - t) M,
    Cov(e - x_0, x_t) = t - (1 - t) S^2 and Var(x_t) = (1 - t)^2 S^2 + t^2, so the conditional mean is affine:
    v* = -M + Cov / Var (x - (1 - t) M)."""
    mean, variance = marginal(t)
    return -M + (t - (1 - t) * S**2) / variance * (x - mean)


def moment_error(x: torch.Tensor, t: float) -> float:
    """The largest |sample moment - marginal moment| over dimensions, in standard errors (the mean's sqrt(V / n), the
    variance's V sqrt(2 / n) for Gaussian samples; every sampler here is affine in Gaussians, so x is Gaussian)."""
    n = x.shape[0]
    mean, variance = marginal(t)
    z_mean = (x.mean(0) - mean) / (variance / n).sqrt()
    z_variance = (x.var(0) - variance) / (variance * math.sqrt(2 / n))
    return max(z_mean.abs().max().item(), z_variance.abs().max().item())


def sample_path(schedule: FlowSchedule, n: int, seed: int, start: int = 0, flip_score: bool = False):
    """Run `schedule` with the exact velocity from step `start` (x drawn from the path's marginal there) to t = 0.
    Returns the first sample, the last one and the worst moment error over the grid times after `start`.

    `flip_score` flips the SDE's correction to the ODE's drift, mean -> ode_mean - (mean - ode_mean) with ode_mean =
    x + v dt: the score term of the reverse SDE with the wrong sign (to first order in dt)."""
    g = torch.Generator().manual_seed(seed)
    sigmas = schedule.sigmas.tolist()
    x0 = M + S * torch.randn(n, 4, generator=g, dtype=torch.float64)
    x = noised_sample(x0, torch.randn(n, 4, generator=g, dtype=torch.float64), sigmas[start])
    first, worst = x, 0.0
    for k in range(start, schedule.num_steps):
        t, t_next = sigmas[k], sigmas[k + 1]
        v = exact_velocity(x, t)
        noise = torch.randn(n, 4, generator=g, dtype=torch.float64)
        out = schedule.step(k, v, x, noise=noise)
        x = 2 * (x + v * (t_next - t)) - out.mean + out.std * noise if flip_score else out.prev_sample
        worst = max(worst, moment_error(x, t_next))
    return first, x, worst


@pytest.mark.parametrize("t", [0.9, 0.4])
def test_the_oracle_velocity_is_the_regression_of_e_minus_x0_on_x_t(t):
    """Checks the test's own oracle: the residual e - x_0 - v*(x_t) is orthogonal to 1 and to x_t (the normal equations
    of least squares, whose solution for jointly Gaussian variables is the conditional mean), within sampling error."""
    g = torch.Generator().manual_seed(0)
    n = 100_000
    x0 = M + S * torch.randn(n, 4, generator=g, dtype=torch.float64)
    e = torch.randn(n, 4, generator=g, dtype=torch.float64)
    x_t = noised_sample(x0, e, t)
    residual = e - x0 - exact_velocity(x_t, t)
    for moment in [residual, residual * (x_t - marginal(t)[0])]:
        assert (moment.mean(0).abs() < Z * moment.std(0) / math.sqrt(n)).all()


def test_noising_and_predict_invert_each_other_with_per_sample_times():
    """With the velocity of a single data point, v = e - x_0, predict recovers (x_0, e) from x_t at any t."""
    g = torch.Generator().manual_seed(1)
    x0, e = torch.randn(3, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)
    t = torch.tensor([1.0, 0.6, 0.05])
    x_t = noised_sample(x0, e, t)
    torch.testing.assert_close(x_t[1], 0.4 * x0[1] + 0.6 * e[1])
    x0_hat, e_hat = predict(e - x0, x_t, t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e_hat, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 10, 28])
def test_grid_matches_diffusers_flow_match_euler_scheduler(shift, num_steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(num_steps)
    ours = FlowSchedule.from_num_steps(num_steps, shift=shift).to("cpu")
    assert ours.sigmas.dtype == torch.float32 and ours.num_steps == num_steps
    torch.testing.assert_close(ours.sigmas, reference.sigmas, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.timesteps, reference.timesteps, atol=1e-3, rtol=0)


def test_stochastic_steps_and_the_schedule_step_is_flow_step():
    grid = FlowSchedule.from_num_steps(10, shift=3.0)
    assert len(FlowSchedule(grid.sigmas, "ode").stochastic_steps) == 0
    memoryless = FlowSchedule(grid.sigmas, "memoryless")
    assert memoryless.stochastic_steps.tolist() == list(range(9))  # the last step onto t = 0 is deterministic
    assert len(FlowSchedule(grid.sigmas, "sde", 0.7, "euler_maruyama").stochastic_steps) == 10
    g = torch.Generator().manual_seed(2)
    v, x, noise = (torch.randn(2, 3, generator=g) for _ in range(3))
    out = memoryless.step(4, v, x, noise=noise)
    expected = flow_step(v, x, grid.sigmas[4], grid.sigmas[5], math.sqrt(2), noise=noise)
    assert torch.equal(out.prev_sample, expected.prev_sample) and torch.equal(out.log_prob, expected.log_prob)


def test_ode_euler_maps_noise_to_the_data_distribution():
    """(a) 400 Euler steps with the exact velocity carry N(0, I) at t = 1 onto N(M, S^2) at t = 0."""
    _, x, _ = sample_path(FlowSchedule.from_num_steps(400), n=2 * N, seed=3)
    assert moment_error(x, 0.0) < Z


SDES = [("sde", 0.3), ("sde", 0.8), ("memoryless", 0.0)]


@pytest.mark.parametrize("kind,noise_level", SDES)
def test_sde_keeps_the_marginals_at_every_grid_time_and_the_flipped_score_does_not(kind, noise_level):
    """(b) The SDE's samples have the rectified-flow marginals N((1 - t) M, (1 - t)^2 S^2 + t^2) at every one of K grid
    times; with the score term's sign flipped they are far off, so this test settles the sign convention."""
    schedule = FlowSchedule.from_num_steps(K, kind=kind, noise_level=noise_level)
    assert sample_path(schedule, n=N, seed=4)[2] < Z
    assert sample_path(schedule, n=N, seed=4, flip_score=True)[2] > 4 * Z


@pytest.mark.parametrize("kind,noise_level", [("sde", 0.8), ("memoryless", 0.0)])
def test_euler_maruyama_keeps_the_marginals_away_from_t_1_and_settles_its_sign(kind, noise_level):
    """(b) The paper's Euler-Maruyama update, started from the exact marginal at t = 0.5: right on every grid time to
    t = 0, far off with the score's sign flipped."""
    schedule = FlowSchedule.from_num_steps(2 * K, kind=kind, noise_level=noise_level, integrator="euler_maruyama")
    start = int((schedule.sigmas > 0.5).sum())
    assert sample_path(schedule, n=N, seed=5, start=start)[2] < Z
    assert sample_path(schedule, n=N, seed=5, start=start, flip_score=True)[2] > 4 * Z


def test_euler_maruyama_misses_the_marginals_next_to_t_1():
    """Why the exponential integrator is the default: two memoryless Euler-Maruyama steps from t = 1 leave the
    variance far above the marginal's, however fine the grid (the drift's rate a^2 / (2 (1 - t)) matches the steps)."""
    schedule = FlowSchedule.from_num_steps(2 * K, kind="memoryless", integrator="euler_maruyama")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64)
    for k in range(2):
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
        x = schedule.step(k, exact_velocity(x, schedule.sigmas[k].item()), x, noise=noise).prev_sample
    assert (x.var(0) / marginal(schedule.sigmas[2].item())[1]).min() > 1.5


@pytest.mark.parametrize("noise_scale", [0.7, MEMORYLESS_NOISE_SCALE])
def test_exponential_step_agrees_with_euler_maruyama_to_first_order(noise_scale):
    """The two integrators differ by O(dt^2) per step in the mean and by a relative O(dt) in the std."""
    g = torch.Generator().manual_seed(7)
    v, x = (torch.randn(2, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    noise, t = torch.zeros_like(x), 0.6
    gaps = []
    for dt in [0.02, 0.01, 0.005]:
        ours = flow_step(v, x, t, t - dt, noise_scale, noise=noise)
        paper = flow_step(v, x, t, t - dt, noise_scale, noise=noise, integrator="euler_maruyama")
        gaps.append(((ours.mean - paper.mean).abs().max().item(), (ours.std / paper.std - 1).abs().max().item()))
        assert (ours.mean - x).abs().max() > 10 * gaps[-1][0]  # the steps themselves are O(dt)
    for (mean_gap, std_gap), (finer_mean_gap, finer_std_gap) in zip(gaps, gaps[1:], strict=False):
        assert 3.5 < mean_gap / finer_mean_gap < 4.5 and 1.8 < std_gap / finer_std_gap < 2.2


def independent_mean_std(v, x, t, t_next, a, integrator):
    """The step's mean and std written as coefficients on x and v (for a t < 1 in the Euler-Maruyama case)."""
    if integrator == "exponential":
        rho = (t_next / (1 - t_next) * (1 - t) / t) ** (a**2 / 2)
        mean = ((1 - t_next) + t_next * rho) * x + (t_next * rho * (1 - t) - (1 - t_next) * t) * v
        return mean, t_next * (1 - rho**2) ** 0.5
    dt = t_next - t
    sigma_sq = a**2 * t / (1 - t)
    mean = (1 + sigma_sq / (2 * t) * dt) * x + (1 + sigma_sq * (1 - t) / (2 * t)) * dt * v
    return mean, (sigma_sq * -dt) ** 0.5


@pytest.mark.parametrize("integrator", ["exponential", "euler_maruyama"])
def test_log_prob_and_its_gradient_match_an_independent_gaussian(integrator):
    """(c) log_prob is torch's Normal log-density averaged over dimensions, and its gradient with respect to the
    velocity matches finite differences (gradcheck) and autograd through the step written independently."""
    g = torch.Generator().manual_seed(8)
    t, t_next, a = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.45, 0.1]), 0.9
    v, x, prev = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    out = flow_step(v, x, t.double(), t_next.double(), a, prev_sample=prev, integrator=integrator)
    mean, std = independent_mean_std(v, x, t.double()[:, None], t_next.double()[:, None], a, integrator)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, std)
    torch.testing.assert_close(out.log_prob, torch.distributions.Normal(mean, std).log_prob(prev).mean(1))

    def log_prob(velocity):
        return flow_step(velocity, x, t.double(), t_next.double(), a, prev_sample=prev, integrator=integrator).log_prob

    def reference_log_prob(velocity):
        mean, std = independent_mean_std(velocity, x, t.double()[:, None], t_next.double()[:, None], a, integrator)
        return torch.distributions.Normal(mean, std).log_prob(prev).mean(1).sum()

    assert torch.autograd.gradcheck(log_prob, (v.clone().requires_grad_(),))
    velocity = v.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(log_prob(velocity).sum(), velocity)
    torch.testing.assert_close(gradient, torch.func.grad(reference_log_prob)(v))


@pytest.mark.parametrize("integrator", ["exponential", "euler_maruyama"])
def test_scoring_a_sampled_step_gives_its_log_prob_per_sample_and_in_fp32(integrator):
    """(c) Scoring the sampled transition reproduces its log_prob exactly; per-sample times (including the first step
    from t = 1) equal one time at a time; a bf16 network output is stepped in fp32."""
    schedule = FlowSchedule.from_num_steps(10, shift=3.0, kind="sde", noise_level=0.7, integrator=integrator)
    g = torch.Generator().manual_seed(9)
    v, x, noise = (torch.randn(4, 1, 8, 8, generator=g) for _ in range(3))
    index = torch.tensor([0, 3, 7, 8])
    sampled = schedule.step(index, v, x, noise=noise)
    scored = schedule.step(index, v, x, prev_sample=sampled.prev_sample)
    assert torch.equal(scored.log_prob, sampled.log_prob) and sampled.log_prob.shape == (4,)
    assert torch.isfinite(sampled.log_prob).all() and (sampled.std > 0).all()
    expected = torch.distributions.Normal(sampled.mean, sampled.std).log_prob(sampled.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(sampled.log_prob, expected)
    for i, k in enumerate(index.tolist()):
        single = schedule.step(k, v[i : i + 1], x[i : i + 1], noise=noise[i : i + 1])
        torch.testing.assert_close(single.prev_sample, sampled.prev_sample[i : i + 1])
        torch.testing.assert_close(single.log_prob, sampled.log_prob[i : i + 1])
    low = schedule.step(index, v.bfloat16(), x, noise=noise)
    assert low.log_prob.dtype == torch.float32 and low.mean.dtype == torch.float32


def test_last_exponential_step_is_deterministic_onto_x0_hat():
    schedule = FlowSchedule.from_num_steps(10, kind="memoryless")
    g = torch.Generator().manual_seed(10)
    v, x, noise = (torch.randn(2, 3, generator=g) for _ in range(3))
    out = schedule.step(9, v, x, noise=noise)
    assert (out.std == 0).all() and (out.log_prob == 0).all()
    torch.testing.assert_close(out.prev_sample, out.x0_hat)
    torch.testing.assert_close(out.x0_hat, x - schedule.sigmas[9] * v)


@pytest.mark.parametrize("integrator", ["exponential", "euler_maruyama"])
def test_memoryless_final_sample_forgets_the_initial_noise_and_the_ode_does_not(integrator):
    """(d) Memoryless sampling makes x_0 (nearly) independent of x_1: their correlation is within sampling error of 0,
    while the ODE's deterministic map keeps them strongly correlated. (With Euler-Maruyama this singles out a = sqrt(2):
    its first step keeps a fraction 1 - a^2 / 2 of x_1; the exponential step forgets x_1 at t = 1 for every a > 0.)"""
    n = 2 * N
    memoryless = FlowSchedule.from_num_steps(50, kind="memoryless", integrator=integrator)
    first, last, _ = sample_path(memoryless, n=n, seed=11)
    assert correlation(first, last).abs().max() < Z / math.sqrt(n)
    first, last, _ = sample_path(FlowSchedule.from_num_steps(50), n=n, seed=11)
    assert correlation(first, last).min() > 0.99


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).mean(0) / (a.square().mean(0) * b.square().mean(0)).sqrt()


def test_transition_kl_is_the_closed_form_for_equal_stds():
    """(f) 0 for identical means; torch's KL of two Normals with the same std otherwise, averaged over dimensions;
    0 on a deterministic step."""
    g = torch.Generator().manual_seed(12)
    mean, reference_mean = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    std = torch.tensor([0.3, 1.0, 0.0]).reshape(3, 1, 1)
    assert torch.equal(transition_kl(mean, mean, std), torch.zeros(3))
    kl = transition_kl(mean, reference_mean, std)
    stochastic = slice(0, 2)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean[stochastic], std[stochastic].expand(2, 2, 4)),
        torch.distributions.Normal(reference_mean[stochastic], std[stochastic].expand(2, 2, 4)),
    ).mean(dim=(1, 2))
    torch.testing.assert_close(kl[stochastic], expected)
    assert kl[2] == 0
