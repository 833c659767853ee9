"""Flow-matching envs, GRPO and DiffusionNFT: the flow grid against diffusers' own scheduler, the ODE step against
diffusers' Euler step, eta's meaning, refusals across model families, group sampling and group advantages, MixGRPO's
window, and the NFT loss's closed-form optimum (autograd)."""

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from rlft.algorithms import ddpo, grpo, nft
from rlft.core.flow import MEMORYLESS_NOISE_SCALE, FlowSchedule
from rlft.core.schedule import DDIMSchedule
from rlft.envs.denoising import DenoisingEnv
from rlft.envs.tasks import preset


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_flow_grid_is_diffusers_flow_match_euler_grid(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    schedule = FlowSchedule.from_scheduler_config(dict(scheduler.config), 10, eta=0.0)
    scheduler.set_timesteps(10)
    torch.testing.assert_close(schedule.sigmas, scheduler.sigmas.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(schedule.timesteps, scheduler.timesteps.float(), atol=1e-3, rtol=0)


def test_the_ode_step_is_diffusers_euler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    schedule = FlowSchedule.from_scheduler_config(dict(scheduler.config), 6, eta=0.0)
    scheduler.set_timesteps(6)
    x, v = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    for k in range(6):
        expected = scheduler.step(v, scheduler.timesteps[k], x).prev_sample
        out = schedule.step(k, v, x, noise=torch.zeros_like(x))
        torch.testing.assert_close(out.prev_sample, expected, atol=1e-5, rtol=1e-5)
        assert float(out.std.max()) == 0.0
        x = expected


def test_eta_is_the_fraction_of_the_memoryless_noise():
    config = dict(FlowMatchEulerDiscreteScheduler().config)
    assert FlowSchedule.from_scheduler_config(config, 5, 0.0).kind == "ode"
    assert FlowSchedule.from_scheduler_config(config, 5, 1.0).kind == "memoryless"
    half = FlowSchedule.from_scheduler_config(config, 5, 0.5)
    assert half.kind == "sde" and half.noise_scale == pytest.approx(0.5 * MEMORYLESS_NOISE_SCALE)
    assert half.eta == pytest.approx(0.5) and half.with_eta(0.0).kind == "ode"
    assert len(half.stochastic_steps) == 4  # the exponential integrator's last step onto t = 0 is deterministic


def saved_config(scheduler) -> dict:
    """A scheduler's config as a model folder's scheduler_config.json holds it (with its `_class_name`)."""
    return {**scheduler.config, "_class_name": type(scheduler).__name__}


def test_each_family_refuses_the_others_scheduler():
    with pytest.raises(ValueError, match="flow-matching model, not a DDPM"):
        DDIMSchedule.from_scheduler_config(saved_config(FlowMatchEulerDiscreteScheduler()), 5, 1.0)
    with pytest.raises(ValueError, match="needs a FlowMatchEulerDiscreteScheduler"):
        FlowSchedule.from_scheduler_config(saved_config(DDPMScheduler()), 5, 1.0)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        FlowSchedule.from_scheduler_config(dict(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config),
                                           5, 1.0)  # fmt: skip


def test_denoising_targets_are_what_each_parameterisation_predicts():
    x0, noise = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    flow = FlowSchedule.from_num_steps(5)
    x_t = flow.add_noise(2, x0, noise)
    torch.testing.assert_close(flow.denoising_target(2, x0, noise), noise - x0)
    torch.testing.assert_close(x_t, (1 - flow.sigmas[2]) * x0 + flow.sigmas[2] * noise)
    config = dict(DDPMScheduler(prediction_type="v_prediction", clip_sample=False).config)
    ddim = DDIMSchedule.from_scheduler_config(config, 5, 1.0)
    from rlft.core.sampler import predict

    eps, x0_hat = predict(ddim, 2, ddim.denoising_target(2, x0, noise), ddim.add_noise(2, x0, noise))
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps, noise, atol=1e-5, rtol=1e-5)


def test_the_shipped_digits_flow_env_passes_the_env_checker():
    from gymnasium.utils.env_checker import check_env

    from rlft.envs.rewards import make_reward
    from rlft.envs.tasks import SingleDenoisingEnv

    env_cfg = preset("digits_flow")
    env = env_cfg.make_env(make_reward("digit", "cpu"), 1)
    assert isinstance(env.schedule, FlowSchedule) and env.schedule.kind == "memoryless"
    check_env(SingleDenoisingEnv(env), skip_render_check=True)


def test_group_size_gives_each_context_to_consecutive_samples():
    counter = iter(range(100))

    def contexts(n, generator):
        return torch.tensor([[float(next(counter))] for _ in range(n)])

    env = DenoisingEnv(8, (1, 2, 2), FlowSchedule.from_num_steps(3), reward=None, context_sampler=contexts,
                       context_shape=(1,))  # fmt: skip
    obs, _ = env.reset(seed=0, options={"group_size": 4})
    assert obs["context"].flatten().tolist() == [0.0] * 4 + [1.0] * 4
    with pytest.raises(ValueError, match="must divide"):
        env.reset(seed=0, options={"group_size": 3})


def test_group_advantages_standardise_within_each_group():
    rewards = torch.tensor([1.0, 3.0, 10.0, 20.0, 5.0])
    keys = ["a", "a", "b", "b", "c"]
    advantages = grpo.group_advantages(rewards, keys, global_std=False)
    torch.testing.assert_close(advantages, torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.0]), atol=1e-5, rtol=0)
    pooled = grpo.group_advantages(rewards, keys, global_std=True)
    torch.testing.assert_close(pooled[:2], torch.tensor([-1.0, 1.0]) / rewards.std(unbiased=False), atol=1e-5, rtol=0)


def test_the_mixgrpo_window_slides_from_the_noisy_end_and_wraps():
    cfg = grpo.Config(window_size=3, window_stride=2)
    steps = torch.arange(9)
    starts = [int(grpo.window_steps(steps, epoch, cfg)[0]) for epoch in range(5)]
    assert starts == [0, 2, 4, 6, 1] and len(grpo.window_steps(steps, 0, cfg)) == 3
    assert torch.equal(grpo.window_steps(steps, 3, grpo.Config()), steps)


def test_the_ratio_skips_near_deterministic_steps_below_min_step_std():
    """The shipped flow's 10-step memoryless grid ends 0.112 -> 0.001 (std 0.001) -> 0 (deterministic): GRPO's and
    DDPO's default min_step_std = 0.01 trains steps 0..7; 0 keeps every stochastic step (DDPO's published choice)."""
    from rlft.algorithms.ddpo import trained_steps

    schedule = preset("digits_flow").schedule()
    assert schedule.std[8] < 0.01 < schedule.std[7]
    assert grpo.Config().min_step_std == ddpo.Config().min_step_std
    assert torch.equal(trained_steps(schedule, grpo.Config().min_step_std), torch.arange(8))
    assert torch.equal(trained_steps(schedule, 0.0), torch.arange(9))
    with pytest.raises(ValueError, match="lower algo.min_step_std or raise env.eta"):
        trained_steps(schedule, 2.0)


@pytest.mark.parametrize("r, beta", [(1.0, 1.0), (0.5, 1.0), (0.8, 0.5), (0.1, 2.0)])
def test_the_nft_loss_is_minimised_at_its_closed_form_policy_improvement(r, beta):
    """Without adaptive weights the loss is quadratic in v_theta with minimiser v_old + (2 r - 1) (v - v_old) / beta
    (v = e - x_0): r = 1/2 keeps the old policy, r = 1 and beta = 1 is plain flow matching. Autograd's gradient
    there is zero, and elsewhere it is not."""
    torch.manual_seed(0)
    x0, noise, v_old = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.full((3, 1, 1, 1), 0.6)
    x_t = (1 - t) * x0 + t * noise
    optimum = v_old + (2 * r - 1) * ((noise - x0) - v_old) / beta
    for v_theta, zero in ((optimum.clone(), True), (optimum + 0.1, False)):
        v_theta.requires_grad_(True)
        loss, _ = nft.nft_loss(v_theta, v_old, x_t, x0, t, torch.full((3,), r), beta, adaptive_weighting=False)
        (grad,) = torch.autograd.grad(loss, v_theta)
        assert (grad.abs().max() < 1e-5) == zero, grad.abs().max()


def test_optimality_maps_clipped_group_advantages_onto_the_unit_interval():
    cfg = nft.Config(adv_clip_max=1.0)
    r = nft.optimality(torch.tensor([0.0, 1.0, 5.0, 5.0]), ["a", "a", "b", "b"], cfg)
    torch.testing.assert_close(r, torch.tensor([0.0, 1.0, 0.5, 0.5]), atol=1e-5, rtol=0)
