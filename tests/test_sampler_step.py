"""The DDIM step with log-probability, against diffusers' own schedulers and the closed-form Gaussian."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from rlft.core.sampler import add_noise, ddim_step, transition_kl
from rlft.core.schedule import DDIMSchedule

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
STEPS = 20


def schedule(eta: float, **options) -> DDIMSchedule:
    config = DDPMScheduler(**{**SCHEDULER_CONFIG, **options}).config
    return DDIMSchedule.from_scheduler_config(config, STEPS, eta)


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
        out = ddim_step(ours, k, eps, x_t, noise=noise)
        torch.testing.assert_close(out.prev_sample, expected, rtol=1e-5, atol=1e-5)
        # the eta override of one call is the same step as a schedule of that eta
        overridden = ddim_step(schedule(0.3), k, eps, x_t, noise=noise, eta=eta)
        torch.testing.assert_close(overridden.prev_sample, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_honours_the_models_prediction_type_as_diffusers_does(prediction_type, eta):
    reference = DDIMScheduler(**SCHEDULER_CONFIG, prediction_type=prediction_type)
    reference.set_timesteps(STEPS)
    ours = schedule(eta, prediction_type=prediction_type)
    assert ours.prediction_type == prediction_type
    for k in [0, 1, STEPS // 2, STEPS - 1]:
        output, x_t, noise = inputs(20 + k)
        expected = reference.step(output, reference.timesteps[k], x_t, eta=eta, variance_noise=noise)
        out = ddim_step(ours, k, output, x_t, noise=noise)
        torch.testing.assert_close(out.prev_sample, expected.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.x0_hat, expected.pred_original_sample, rtol=1e-5, atol=1e-5)
        # the same output read as an epsilon would be another estimate of x_0 (except at timestep 1, where both
        # readings give x_0 = x_t to within sqrt(1 - a_t))
        as_epsilon = ddim_step(schedule(eta), k, output, x_t, noise=noise)
        if k < STEPS - 1:
            assert not torch.allclose(as_epsilon.x0_hat, expected.pred_original_sample, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("clip_sample_range", [1.0, 0.5])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_clips_x0_as_the_models_scheduler_does_without_recomputing_eps(clip_sample_range, eta):
    """google/ddpm-* configs set clip_sample: true (range 1): x0_hat is clipped, and eps stays the network's
    (diffusers' use_clipped_model_output=False, DDIMPipeline's default)."""
    options = dict(clip_sample=True, clip_sample_range=clip_sample_range)
    reference = DDIMScheduler(**{**SCHEDULER_CONFIG, **options})
    reference.set_timesteps(STEPS)
    ours = schedule(eta, **options)
    assert ours.clip_sample_range == clip_sample_range
    clipped_somewhere = False
    for k in [0, 1, STEPS // 2, STEPS - 2, STEPS - 1]:
        eps, x_t, noise = inputs(40 + k)
        x_t = 3 * x_t  # x0_hat well outside [-1, 1] at every step
        t = reference.timesteps[k]
        expected = reference.step(eps, t, x_t, eta=eta, variance_noise=noise)
        out = ddim_step(ours, k, eps, x_t, noise=noise)
        torch.testing.assert_close(out.prev_sample, expected.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.x0_hat, expected.pred_original_sample, rtol=1e-6, atol=1e-6)
        assert out.x0_hat.abs().max() <= clip_sample_range
        unclipped = ddim_step(schedule(eta), k, eps, x_t, noise=noise)
        if unclipped.x0_hat.abs().max() > clip_sample_range:
            clipped_somewhere = True
            assert not torch.allclose(unclipped.prev_sample, out.prev_sample)
            # diffusers' other reading (eps recomputed from the clipped x0_hat) is not this step
            recomputed = reference.step(eps, t, x_t, eta=eta, variance_noise=noise, use_clipped_model_output=True)
            if k < STEPS - 1:  # the last step lands on x0_hat itself, whatever eps is
                assert not torch.allclose(recomputed.prev_sample, out.prev_sample, rtol=1e-4, atol=1e-4)
    assert clipped_somewhere


def test_thresholding_is_refused_by_name():
    config = DDPMScheduler(**SCHEDULER_CONFIG, thresholding=True).config
    with pytest.raises(ValueError, match="thresholding"):
        DDIMSchedule.from_scheduler_config(config, STEPS, 1.0)


def test_log_prob_is_the_gaussian_density_averaged_over_dimensions():
    s = schedule(1.0)
    eps, x_t, noise = inputs(1)
    out = ddim_step(s, 3, eps, x_t, noise=noise)
    expected = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-6, atol=1e-6)
    assert out.log_prob.dtype == torch.float32 and out.log_prob.shape == (4,)


def test_scoring_the_sampled_action_gives_the_same_log_prob_and_bf16_network_output_is_scored_in_fp32():
    s = schedule(1.0)
    eps, x_t, noise = inputs(2)
    sampled = ddim_step(s, 5, eps, x_t, noise=noise)
    scored = ddim_step(s, 5, eps, x_t, prev_sample=sampled.prev_sample)
    assert torch.equal(scored.log_prob, sampled.log_prob)
    low = ddim_step(s, 5, eps.bfloat16(), x_t, noise=noise)
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
        out = ddim_step(ours, k, eps, x_t, noise=noise)
        torch.testing.assert_close(out.prev_sample, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.std[0].square().squeeze(), ddpm._get_variance(t), rtol=1e-5, atol=1e-8)


def test_per_sample_timesteps_match_one_timestep_at_a_time():
    s = schedule(1.0)
    eps, x_t, noise = inputs(3)
    index = torch.tensor([0, 7, 13, 19])
    batched = ddim_step(s, index, eps, x_t, noise=noise)
    for i, k in enumerate(index.tolist()):
        single = ddim_step(s, k, eps[i : i + 1], x_t[i : i + 1], noise=noise[i : i + 1])
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)
        torch.testing.assert_close(batched.prev_sample[i : i + 1], single.prev_sample)


def test_gradients_flow_from_the_action_to_the_network_output():
    s = schedule(0.0)
    eps, x_t, noise = inputs(4)
    eps.requires_grad_(True)
    ddim_step(s, 2, eps, x_t, noise=noise).prev_sample.sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0


def test_asks_for_exactly_one_of_noise_or_prev_sample():
    eps, x_t, noise = inputs(5)
    with pytest.raises(ValueError, match="exactly one"):
        ddim_step(schedule(1.0), 3, eps, x_t)
    with pytest.raises(ValueError, match="exactly one"):
        ddim_step(schedule(1.0), 3, eps, x_t, noise=noise, prev_sample=x_t)


def test_deterministic_steps_have_zero_log_prob_and_are_listed_as_such():
    s = schedule(1.0)
    assert s.std[-1] == 0 and (s.std[:-1] > 0).all()  # the last step lands on alpha-bar = 1
    assert s.stochastic_steps.tolist() == list(range(STEPS - 1))
    eps, x_t, noise = inputs(6)
    last = ddim_step(s, STEPS - 1, eps, x_t, noise=noise)
    assert torch.equal(last.log_prob, torch.zeros(4)) and torch.isfinite(last.prev_sample).all()
    assert schedule(0.0).stochastic_steps.numel() == 0


def test_add_noise_is_diffusers_forward_process_at_the_steps_timestep():
    ddpm = DDPMScheduler(**SCHEDULER_CONFIG)
    s = schedule(1.0)
    x0, noise, _ = inputs(7)
    for k in [0, 5, STEPS - 1]:
        expected = ddpm.add_noise(x0, noise, s.timesteps[k].expand(4))
        torch.testing.assert_close(add_noise(s, k, x0, noise), expected, rtol=1e-6, atol=1e-6)
    index = torch.tensor([0, 3, 11, 19])  # one step per sample
    expected = ddpm.add_noise(x0, noise, s.timesteps[index])
    torch.testing.assert_close(add_noise(s, index, x0, noise), expected, rtol=1e-6, atol=1e-6)


def test_transition_kl_is_the_kl_of_the_two_gaussians_averaged_over_dimensions():
    s = schedule(1.0)
    eps, x_t, noise = inputs(8)
    ref_eps = eps + 0.3 * torch.randn(eps.shape, generator=torch.Generator().manual_seed(1))
    for k in [0, 7, STEPS - 2]:
        ours, ref = ddim_step(s, k, eps, x_t, noise=noise), ddim_step(s, k, ref_eps, x_t, noise=noise)
        std = ours.std.expand_as(ours.mean)
        expected = torch.distributions.kl_divergence(
            torch.distributions.Normal(ours.mean, std), torch.distributions.Normal(ref.mean, std)
        ).mean(dim=(1, 2, 3))
        kl = transition_kl(ours.mean, ref.mean, ours.std)
        assert kl.shape == (4,) and (kl > 0).all()
        torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(transition_kl(ours.mean, ours.mean, ours.std), torch.zeros(4))
    # a deterministic step (std = 0) has no density: its KL is 0, not inf or NaN
    last, ref_last = ddim_step(s, STEPS - 1, eps, x_t, noise=noise), ddim_step(s, STEPS - 1, ref_eps, x_t, noise=noise)
    assert not torch.allclose(last.mean, ref_last.mean)
    assert torch.equal(transition_kl(last.mean, ref_last.mean, last.std), torch.zeros(4))
    deterministic = ddim_step(schedule(0.0), 3, eps, x_t, noise=noise)
    assert torch.equal(transition_kl(deterministic.mean, ref.mean, deterministic.std), torch.zeros(4))
