"""The DDIM step with log-probability, against diffusers' own schedulers and the closed-form Gaussian."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from rlft.envs.schedule import DDIMSchedule

from rlft.policy import ddim_step

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
STEPS = 20


def schedule(eta: float) -> DDIMSchedule:
    return DDIMSchedule.from_scheduler_config(DDPMScheduler(**SCHEDULER_CONFIG).config, STEPS, eta)


def inputs(seed: int, shape=(4, 1, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_matches_diffusers_ddim_step_given_the_same_noise(eta):
    reference = DDIMScheduler(**SCHEDULER_CONFIG)
    reference.set_timesteps(STEPS)
    ours = schedule(eta)
    assert torch.equal(ours.timesteps, reference.timesteps.to(torch.int64))
    for k in [0, 1, STEPS // 2, STEPS - 1]:
        eps, x_t, noise = inputs(k)
        expected = reference.step(eps, reference.timesteps[k], x_t, eta=eta, variance_noise=noise).prev_sample
        out = ddim_step(eps, x_t, ours.alpha_prod[k], ours.alpha_prod_prev[k], eta, noise=noise)
        torch.testing.assert_close(out.prev_sample, expected, rtol=1e-5, atol=1e-5)


def test_log_prob_is_the_gaussian_density_averaged_over_dimensions():
    s = schedule(1.0)
    eps, x_t, noise = inputs(1)
    out = ddim_step(eps, x_t, s.alpha_prod[3], s.alpha_prod_prev[3], 1.0, noise=noise)
    expected = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-6, atol=1e-6)
    assert out.log_prob.dtype == torch.float32 and out.log_prob.shape == (4,)


def test_scoring_the_sampled_action_gives_the_same_log_prob_and_bf16_network_output_is_scored_in_fp32():
    s = schedule(1.0)
    eps, x_t, noise = inputs(2)
    sampled = ddim_step(eps, x_t, s.alpha_prod[5], s.alpha_prod_prev[5], 1.0, noise=noise)
    scored = ddim_step(eps, x_t, s.alpha_prod[5], s.alpha_prod_prev[5], 1.0, prev_sample=sampled.prev_sample)
    assert torch.equal(scored.log_prob, sampled.log_prob)
    low = ddim_step(eps.bfloat16(), x_t, s.alpha_prod[5], s.alpha_prod_prev[5], 1.0, noise=noise)
    assert low.log_prob.dtype == torch.float32 and low.mean.dtype == torch.float32


def test_eta_one_is_the_ddpm_posterior_given_the_same_noise():
    """eta = 1 reproduces diffusers' DDPMScheduler (fixed_small variance) over the same strided timesteps."""
    ddpm = DDPMScheduler(**SCHEDULER_CONFIG, variance_type="fixed_small")
    ddpm.set_timesteps(STEPS)
    ours = schedule(1.0)
    for k in [0, 4, STEPS - 2]:
        t = int(ddpm.timesteps[k])
        eps, x_t, _ = inputs(10 + k)
        expected = ddpm.step(eps, t, x_t, generator=torch.Generator().manual_seed(k)).prev_sample
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(k))
        out = ddim_step(eps, x_t, ours.alpha_prod[k], ours.alpha_prod_prev[k], 1.0, noise=noise)
        torch.testing.assert_close(out.prev_sample, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.std[0].square().squeeze(), ddpm._get_variance(t), rtol=1e-5, atol=1e-8)


def test_per_sample_timesteps_match_one_timestep_at_a_time():
    s = schedule(1.0)
    eps, x_t, noise = inputs(3)
    index = torch.tensor([0, 7, 13, 19])
    batched = ddim_step(eps, x_t, s.alpha_prod[index], s.alpha_prod_prev[index], 1.0, noise=noise)
    for i, k in enumerate(index):
        single = ddim_step(eps[i : i + 1], x_t[i : i + 1], s.alpha_prod[k], s.alpha_prod_prev[k], 1.0,
                           noise=noise[i : i + 1])  # fmt: skip
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)
        torch.testing.assert_close(batched.prev_sample[i : i + 1], single.prev_sample)


def test_gradients_flow_from_the_action_to_the_network_output():
    s = schedule(0.0)
    eps, x_t, noise = inputs(4)
    eps.requires_grad_(True)
    ddim_step(eps, x_t, s.alpha_prod[2], s.alpha_prod_prev[2], 0.0, noise=noise).prev_sample.sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0


def test_asks_for_exactly_one_of_noise_or_prev_sample():
    eps, x_t, noise = inputs(5)
    with pytest.raises(ValueError, match="exactly one"):
        ddim_step(eps, x_t, 0.5, 0.6, 1.0)


def test_deterministic_steps_have_zero_log_prob_and_are_listed_as_such():
    s = schedule(1.0)
    assert s.std[-1] == 0 and (s.std[:-1] > 0).all()  # the last step lands on alpha-bar = 1
    assert s.stochastic_steps.tolist() == list(range(STEPS - 1))
    eps, x_t, noise = inputs(6)
    last = ddim_step(eps, x_t, s.alpha_prod[-1], s.alpha_prod_prev[-1], 1.0, noise=noise)
    assert torch.equal(last.log_prob, torch.zeros(4)) and torch.isfinite(last.prev_sample).all()
    assert schedule(0.0).stochastic_steps.numel() == 0
