"""DDPO: the clipped loss and its gradient by hand, ratio == 1 on-policy, advantages."""

import dataclasses
import math

import pytest
import torch
from tensordict import TensorDict

from rlft.algorithms import ddpo
from rlft.core.sampler import ddim_step
from rlft.envs.models import load_ddpm
from rlft.learner import Learner
from rlft.rollout import RolloutWorker
from tests.helpers import tiny_cfg


def test_loss_and_gradient_match_a_hand_computation():
    log_prob_old = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    shift = torch.tensor([0.05, -0.05, 0.05, 0.0005])  # ratio = exp(shift): two outside the clip range, two inside
    advantages = torch.tensor([1.0, 1.0, -2.0, 0.5])
    eps = 0.01
    log_prob = (log_prob_old + shift).requires_grad_(True)
    loss, info = ddpo.ddpo_loss(log_prob, log_prob_old, advantages, eps)
    loss.backward()

    expected_loss, expected_grad = 0.0, []
    for s, a in zip(shift.tolist(), advantages.tolist(), strict=True):
        r = math.exp(s)
        unclipped, clipped = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
        expected_loss += max(unclipped, clipped) / 4
        # the gradient flows only where the unclipped term is the larger one (strictly)
        expected_grad.append(-a * r / 4 if unclipped > clipped or r == min(max(r, 1 - eps), 1 + eps) else 0.0)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    torch.testing.assert_close(log_prob.grad, torch.tensor(expected_grad), rtol=1e-6, atol=1e-8)
    # samples 0 (A>0, ratio above 1+eps) and 2 (A<0, ratio above) are clipped; 1 (A>0, ratio below) is not
    assert expected_grad[0] == 0 and expected_grad[1] != 0 and expected_grad[2] != 0 and expected_grad[3] != 0
    assert info["clip_fraction"].item() == pytest.approx(0.75)
    assert info["approx_kl"].item() == pytest.approx(0.5 * (shift**2).mean().item(), rel=1e-4)


def test_first_inner_step_is_exactly_on_policy(tiny_model_dir):
    """Before any update the learner's log-probabilities equal the rollout's bit for bit: ratio == 1."""
    cfg = tiny_cfg(tiny_model_dir, "algo.minibatch_size=16", "trainer.rollout_batch_size=16")
    worker = RolloutWorker(cfg)
    learner = Learner(cfg, torch.device("cpu"))
    learner.ingest([("batch-0", worker.collect(0, seed=7, n=16))])
    minibatch = next(iter(learner.buffer.minibatches()))
    metrics = ddpo.train_step(learner.ctx, minibatch, learner.algo)
    assert metrics["ddpo/ratio"] == 1.0
    assert metrics["ddpo/approx_kl"] == 0.0
    assert metrics["ddpo/clip_fraction"] == 0.0
    # ... and after that step the policy has moved, so the ratio no longer is 1
    again = ddpo.train_step(learner.ctx, minibatch, learner.algo)
    assert again["ddpo/approx_kl"] > 0


def test_timestep_fraction_trains_on_that_share_of_stochastic_steps(tiny_model_dir):
    cfg = tiny_cfg(tiny_model_dir, "env.num_inference_steps=9", "algo.timestep_fraction=0.5",
                   "algo.kl_weight=0")  # counts the policy's calls; the KL adds the reference model's
    worker, learner = RolloutWorker(cfg), Learner(cfg, torch.device("cpu"))
    batch = worker.collect(0, seed=1, n=8)
    batch["advantage"] = torch.randn(8)
    calls = []
    original = learner.policy.step

    def counting_step(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    learner.policy.step = counting_step
    ddpo.train_step(learner.ctx, batch, learner.algo)
    assert len(calls) == 4  # 8 stochastic steps (the 9th lands on alpha-bar = 1), half of them
    assert all(int(index.max()) < 8 for index in calls)


def test_batch_advantages_are_standardised_and_clipped():
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0])
    batch = TensorDict({"reward": rewards, "context": torch.zeros(8, 0)}, batch_size=[8])
    cfg = ddpo.Config(adv_clip_max=2.0)
    out = ddpo.compute_advantages(batch, cfg, ddpo.PerContextStatTracker(64, 16))
    assert out["advantage"].max() == 2.0  # (100 - 12.5) / 33 = 2.65, clipped
    assert out["advantage"][0] == pytest.approx(-12.5 / rewards.std(unbiased=False).item(), rel=1e-4)


def test_per_context_statistics_after_enough_samples():
    tracker = ddpo.PerContextStatTracker(window=8, min_count=4)
    keys = ["a"] * 4 + ["b"] * 4
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0])
    advantages = tracker.standardise(rewards, keys)
    # each context is standardised by its own statistics, so both get the same advantages
    torch.testing.assert_close(advantages[:4], advantages[4:])
    torch.testing.assert_close(advantages[:4].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_stacked_timesteps_give_the_same_gradient(tiny_model_dir):
    """Timesteps stacked into one network call (3 per call, 8 steps: calls of 3, 3 and 2) change only the grouping
    of the same per-timestep losses: the loss, the metrics and the gradient match one timestep per call."""
    cfg = tiny_cfg(tiny_model_dir, "env.num_inference_steps=9")
    worker, learner = RolloutWorker(cfg), Learner(cfg, torch.device("cpu"))
    batch = worker.collect(0, seed=3, n=8)
    batch["advantage"] = torch.randn(8, generator=torch.Generator().manual_seed(0))
    params = [p for p in learner.policy.parameters() if p.requires_grad]
    grads = []  # the gradients the optimizer step sees (optimizer_step drops them afterwards)
    # keep the weights: both groupings see the same policy
    learner.ctx.optimizer.step = lambda: grads.append([p.grad.clone() for p in params])

    results = []
    for k in (1, 3):
        learner.ctx.generator.manual_seed(5)  # the same random timestep order for both
        metrics = ddpo.train_step(learner.ctx, batch, ddpo.Config(timesteps_per_forward=k, max_grad_norm=1e9))
        results.append((metrics, grads[-1]))
    assert len(grads) == 2
    (one, grads_one), (stacked, grads_stacked) = results
    assert stacked["loss/policy"] == pytest.approx(one["loss/policy"], rel=1e-5, abs=1e-7)
    assert stacked["ddpo/approx_kl"] == pytest.approx(one["ddpo/approx_kl"], rel=1e-4, abs=1e-9)
    assert sum(g.abs().sum() for g in grads_one) > 0
    for g1, g3 in zip(grads_one, grads_stacked, strict=True):
        torch.testing.assert_close(g3, g1, rtol=1e-4, atol=1e-6)


def kl_to_base_by_hand(policy, base_unet, batch) -> float:
    """Mean over the batch and every trained step of KL(N(mean_policy, std^2) || N(mean_base, std^2)) per
    dimension, with the base model's mean from the network loaded afresh from disk (torch.distributions' KL)."""
    schedule, kls = policy.schedule, []
    with torch.no_grad():
        for k in ddpo.trained_steps(schedule, ddpo.Config().min_step_std).tolist():
            x_t, x_prev, context = batch["latents"][:, k], batch["latents"][:, k + 1], batch["context"]
            ours = policy.step(x_t, k, context, prev_sample=x_prev)
            t = schedule.timesteps[k].expand(len(x_t))
            base = ddim_step(schedule, k, base_unet(x_t, t).sample, x_t, prev_sample=x_prev)
            std = ours.std.expand_as(ours.mean)
            kl = torch.distributions.kl_divergence(torch.distributions.Normal(ours.mean, std),
                                                   torch.distributions.Normal(base.mean, std))  # fmt: skip
            kls.append(kl.mean(dim=(1, 2, 3)).mean())
    return torch.stack(kls).mean().item()


def test_kl_penalty_is_the_transition_kl_to_the_frozen_base_model(tiny_model_dir):
    """With algo.kl_weight > 0 each trained step adds kl_weight x the exact KL of the policy's transition to the frozen
    base model's: 0 before any update (policy == reference), then the KL to the base as it was loaded, not to the
    policy of the moment."""
    cfg = tiny_cfg(tiny_model_dir, "algo.kl_weight=2.0", "algo.lr=3e-3")
    worker, learner = RolloutWorker(cfg), Learner(cfg, torch.device("cpu"))
    batch = worker.collect(0, seed=7, n=8)
    batch = ddpo.compute_advantages(batch, learner.algo, learner.state)
    base_unet = load_ddpm(str(tiny_model_dir))[0].eval()

    first = ddpo.train_step(learner.ctx, batch, learner.algo)
    assert first["ddpo/kl_to_base"] == 0.0
    for _ in range(2):
        ddpo.train_step(learner.ctx, batch, learner.algo)
    expected = kl_to_base_by_hand(learner.policy, base_unet, batch)
    assert expected > 0

    # the same weights with and without the penalty (no optimizer step): the loss differs by kl_weight x the KL
    learner.ctx.optimizer.step = lambda: None
    results = {}
    for weight in (0.0, 2.0):
        learner.ctx.generator.manual_seed(11)
        results[weight] = ddpo.train_step(learner.ctx, batch, dataclasses.replace(learner.algo, kl_weight=weight))
    assert "ddpo/kl_to_base" not in results[0.0]
    assert results[2.0]["ddpo/kl_to_base"] == pytest.approx(expected, rel=1e-4)
    assert results[2.0]["loss/policy"] - results[0.0]["loss/policy"] == pytest.approx(2.0 * expected, rel=1e-4)


def test_kl_penalty_keeps_the_weights_nearer_the_base(tiny_model_dir):
    """The same run (seed, batch, steps) with and without algo.kl_weight: the penalised one ends nearer the base."""
    distances, final_kl = {}, {}
    base_unet = load_ddpm(str(tiny_model_dir))[0].eval()
    for weight in (0.0, 10.0):
        cfg = tiny_cfg(tiny_model_dir, f"algo.kl_weight={weight}")
        worker, learner = RolloutWorker(cfg), Learner(cfg, torch.device("cpu"))
        batch = worker.collect(0, seed=7, n=8)
        batch = ddpo.compute_advantages(batch, learner.algo, learner.state)
        before = learner.policy.trainable_state_dict()
        for _ in range(8):
            ddpo.train_step(learner.ctx, batch, learner.algo)
        after = learner.policy.trainable_state_dict()
        distances[weight] = sum((after[k] - before[k]).pow(2).sum() for k in before).sqrt().item()
        final_kl[weight] = kl_to_base_by_hand(learner.policy, base_unet, batch)
    assert 0 < distances[10.0] < 0.9 * distances[0.0]
    assert final_kl[10.0] < final_kl[0.0]
