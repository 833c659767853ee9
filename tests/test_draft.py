"""DRaFT, DRaFT-K, DRaFT-LV: gradients against hand computations, checkpointing, LoRA adapters, config, a run."""

import copy
import json
import math

import pytest
import torch
from diffusers import DDIMScheduler

from rlft.algorithms import LearnerContext, draft
from rlft.config import ConfigError, compose, validate
from rlft.core.sampler import ddim_step
from rlft.envs.models import load_ddpm
from rlft.envs.rewards import Reward, evaluate_reward
from rlft.learner import Learner
from rlft.lora import load_adapters, merge_adapters, save_adapters
from rlft.rollout import RolloutWorker, build_policy
from rlft.run import main
from tests.helpers import run_rlft

TINY = ["algo=draft", "env.num_inference_steps=4", "trainer.rollout_batch_size=4", "eval.num_samples=4",
        "ray.rollout_threads=1", "ray.learner_threads=1", "logging.wandb=disabled",
        "logging.progress=false"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model is fastest on one thread


def draft_cfg(model_dir, *overrides: str):
    return compose([f"env.base_model={model_dir}", *TINY, *overrides])


def quadratic_reward() -> Reward:
    """r(x) = -mean (x - 0.3)^2: smooth, differentiable, and its gradient is known."""
    return Reward("quadratic", lambda images, **context: -((images - 0.3) ** 2).mean(dim=(1, 2, 3)), True)


def context_of(policy, env) -> LearnerContext:
    """What draft's sampling functions need from a learner: the policy (called directly), its env, a generator."""
    return LearnerContext(policy, policy, None, env, None, torch.Generator().manual_seed(0), torch.device("cpu"))


def lv_images(ctx, x_0, context, noise) -> torch.Tensor:
    """DRaFT-LV's images: n re-noised copies of x_0 ([n, B, ...] noise), each denoised by the last step."""
    last = ctx.policy.schedule.num_steps - 1
    copies = draft.renoise(ctx, x_0, noise)
    return draft.deterministic_step(ctx, last, copies, context.repeat(len(noise), *([1] * (context.dim() - 1))))


def trainable_grads(policy, loss) -> list[torch.Tensor]:
    params = [p for p in policy.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params))


def setup(model_dir, *overrides, batch=3, seed=0):
    cfg = draft_cfg(model_dir, *overrides)
    policy, env, _ = build_policy(cfg, torch.device("cpu"))
    x_T = torch.randn((batch, 1, 16, 16), generator=torch.Generator().manual_seed(seed))
    return cfg, policy, context_of(policy, env), x_T, torch.zeros(batch, 0)


def test_k1_gradient_equals_the_gradient_through_the_last_step_alone(tiny_model_dir):
    cfg, policy, ctx, x_T, context = setup(tiny_model_dir, "env.num_inference_steps=5")
    reward = quadratic_reward()
    images = draft.sample(ctx, x_T, context, k=1)
    loss = draft.draft_loss(*evaluate_reward(reward, images, {}), 1.0)
    grads = trainable_grads(policy, loss)

    # by hand: diffusers' own DDIM (eta 0) for the first T-1 steps without gradient, then the last step's formula
    unet, scheduler_config = policy.unet, load_ddpm(str(tiny_model_dir))[1]
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(5)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps[:-1]:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    t_last = scheduler.timesteps[-1]
    a = scheduler.alphas_cumprod[t_last]
    assert scheduler.final_alpha_cumprod == 1.0  # so the last step lands on x0_hat itself
    x_0 = (x - (1 - a).sqrt() * unet(x, t_last).sample) / a.sqrt()
    expected = trainable_grads(policy, ((x_0 - 0.3) ** 2).mean(dim=(1, 2, 3)).mean())
    torch.testing.assert_close(images, x_0, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)

    # ... and it is not the full DRaFT gradient, which flows through all five steps
    full = draft.sample(ctx, x_T, context, k=None)
    full_grads = trainable_grads(policy, draft.draft_loss(*evaluate_reward(reward, full, {}), 1.0))
    difference = sum((f - g).norm() for f, g in zip(full_grads, grads, strict=True))
    assert difference > 1e-3 * sum(g.norm() for g in grads)


def test_full_draft_gradients_are_the_same_with_and_without_checkpointing(tiny_model_dir):
    reward = quadratic_reward()
    results = {}
    for checkpointing in (False, True):
        _, policy, ctx, x_T, context = setup(tiny_model_dir, f"policy.gradient_checkpointing={checkpointing}")
        calls = []
        policy.unet.register_forward_pre_hook(lambda *args, calls=calls: calls.append(1))  # also on recomputation
        images = draft.sample(ctx, x_T, context, k=None)
        loss = draft.draft_loss(*evaluate_reward(reward, images, {}), 1.0)
        results[checkpointing] = (loss.detach(), trainable_grads(policy, loss), len(calls))
    (loss_plain, grads_plain, calls_plain), (loss_ckpt, grads_ckpt, calls_ckpt) = results[False], results[True]
    assert calls_plain == 4 and calls_ckpt == 8  # checkpointing recomputes every network call in the backward pass
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=0)
    for a, b in zip(grads_ckpt, grads_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_checkpointing_is_on_by_default_for_draft_only(tiny_model_dir):
    cfg = draft_cfg(tiny_model_dir)
    assert build_policy(cfg, torch.device("cpu"))[0].gradient_checkpointing
    ddpo_cfg = compose([f"env.base_model={tiny_model_dir}", "logging.wandb=disabled"])
    assert not build_policy(ddpo_cfg, torch.device("cpu"))[0].gradient_checkpointing


def test_lv_averages_n_renoised_samples_each_denoised_by_one_step(tiny_model_dir):
    _, policy, ctx, x_T, context = setup(tiny_model_dir)
    schedule = policy.schedule
    reward = quadratic_reward()
    with torch.no_grad():
        x_0 = draft.sample(ctx, x_T, context, k=None)
    n = 3
    noise = torch.randn((n, *x_0.shape), generator=torch.Generator().manual_seed(5))
    images = lv_images(ctx, x_0, context, noise)
    assert images.shape == (n * 3, 1, 16, 16)
    loss = draft.draft_loss(*evaluate_reward(reward, images, {}), 1.0)
    grads = trainable_grads(policy, loss)

    a = schedule.alpha_prod[-1]  # the last sampling timestep; its step lands on alpha-bar = 1
    t_last = schedule.timesteps[-1]
    expected_loss, expected_grads = 0.0, [torch.zeros_like(p) for p in policy.parameters() if p.requires_grad]
    for i in range(n):
        x_1 = a.sqrt() * x_0 + (1 - a).sqrt() * noise[i]
        x0_i = (x_1 - (1 - a).sqrt() * policy.unet(x_1, t_last).sample) / a.sqrt()
        loss_i = ((x0_i - 0.3) ** 2).mean(dim=(1, 2, 3)).mean() / n
        expected_loss += loss_i.item()
        grads_i = trainable_grads(policy, loss_i)
        expected_grads = [e + g for e, g in zip(expected_grads, grads_i, strict=True)]
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # one re-noised copy gives a different (noisier) estimate than the average of three
    single = lv_images(ctx, x_0, context, noise[:1])
    assert not torch.allclose(single, images[:3]) or not torch.allclose(single, images[3:6])


def test_non_finite_rewards_are_left_out_of_the_loss():
    rewards = torch.tensor([1.0, float("nan"), 3.0])
    loss = draft.draft_loss(rewards, torch.isfinite(rewards), 2.0)
    assert loss.item() == pytest.approx(-4.0)


@pytest.mark.parametrize("function", ["half_nan", "all_nan"])
def test_non_finite_rewards_never_reach_the_weights(tiny_model_dir, function):
    """Whole DRaFT updates with a differentiable reward that is NaN for half of each batch, or all of it: the NaN rows
    are counted and cut off from the gradient, so every weight stays finite; the finite half still trains, and with
    no finite reward at all the weights do not change."""
    from tests import nan_rewards

    # the reward's own backward pass is NaN for its NaN rows, even under a zero upstream gradient
    x = torch.randn(4, 1, 16, 16, requires_grad=True)
    values = getattr(nan_rewards, function)(x)
    draft.draft_loss(values, torch.isfinite(values), 1.0).backward()
    assert not torch.isfinite(x.grad).all()

    steps, batch = 3, 4
    cfg = draft_cfg(tiny_model_dir, "reward=python", f"reward.function=tests.nan_rewards:{function}",
                    "reward.differentiable=true", "algo.lr=1e-2", f"algo.steps_per_epoch={steps}")  # fmt: skip
    validate(cfg)
    learner = Learner(cfg, torch.device("cpu"))
    before = learner.policy.trainable_state_dict()
    metrics = draft.update(learner.ctx, learner.algo, learner.state)
    after = learner.policy.trainable_state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert metrics["train/optimizer_steps"] == steps
    if function == "half_nan":
        assert metrics["reward/nonfinite"] == steps * batch // 2
        assert metrics["train/skipped_steps"] == 0 and metrics["train/grad_norm"] > 0
        assert math.isfinite(metrics["loss/policy"]) and math.isfinite(metrics["reward/mean"])
        assert any(not torch.equal(before[k], v) for k, v in after.items())
    else:
        assert metrics["reward/nonfinite"] == steps * batch
        assert metrics["train/skipped_steps"] == steps or metrics["train/grad_norm"] == 0
        assert all(torch.equal(before[k], v) for k, v in after.items())


def test_kl_to_base_is_the_path_kl_of_the_memoryless_transitions(tiny_model_dir):
    """algo.kl_weight > 0: draft/kl_to_base is 0 before any update (policy == base), and afterwards the KL between the
    policy's and the frozen base model's eta = 1 transitions at the states the deterministic sampler visits, summed
    over the differentiable (last k) steps; the base model's from the network loaded afresh from disk."""
    steps, k = 4, 3
    cfg = draft_cfg(tiny_model_dir, f"env.num_inference_steps={steps}", f"algo.k={k}", "algo.kl_weight=1.0",
                    "algo.lr=3e-3")  # fmt: skip
    learner = Learner(cfg, torch.device("cpu"))
    ctx = learner.ctx
    ctx.env.reward = quadratic_reward()
    first = draft.train_step(ctx, learner.algo, learner.state)
    assert first["draft/kl_to_base"] == 0.0
    for _ in range(3):
        draft.train_step(ctx, learner.algo, learner.state)

    # by hand: the same x_T (the learner's generator draws the env's reset seed), diffusers' DDIM (eta 0) for the
    # visited states, and torch.distributions' KL of the two Gaussian transitions at eta = 1
    policy, base = learner.policy, load_ddpm(str(tiny_model_dir))[0].eval()
    scheduler = DDIMScheduler.from_config(load_ddpm(str(tiny_model_dir))[1])
    scheduler.set_timesteps(steps)
    state = ctx.generator.get_state()
    seed = int(torch.randint(2**62, (1,), generator=ctx.generator))
    x = ctx.env.reset(seed=seed)[0]["x_t"]
    expected = torch.zeros(len(x))
    with torch.no_grad():
        for step, t in enumerate(scheduler.timesteps):
            output = policy.unet(x, t).sample
            if step >= steps - k:
                ours = ddim_step(policy.schedule, step, output, x, noise=torch.zeros_like(x), eta=1.0)
                theirs = ddim_step(policy.schedule, step, base(x, t).sample, x, noise=torch.zeros_like(x), eta=1.0)
                if step < steps - 1:  # the last step lands on alpha-bar = 1: no density, no KL
                    std = ours.std.expand_as(ours.mean)
                    expected += torch.distributions.kl_divergence(torch.distributions.Normal(ours.mean, std),
                                                                  torch.distributions.Normal(theirs.mean, std)).mean(
                        dim=(1, 2, 3))  # fmt: skip
                else:
                    assert (ours.std == 0).all()
            x = scheduler.step(output, t, x, eta=0.0).prev_sample
    ctx.generator.set_state(state)
    metrics = draft.train_step(ctx, learner.algo, learner.state)
    assert expected.mean() > 0
    assert metrics["draft/kl_to_base"] == pytest.approx(expected.mean().item(), rel=1e-4)


@pytest.mark.parametrize("overrides", [["algo.k=1"], ["algo.variant=lv", "algo.lv_samples=2"],
                                       ["algo.aux_loss_weight=0.5", "policy.lora_rank=2"]])  # fmt: skip
def test_update_raises_the_reward(tiny_model_dir, overrides):
    cfg = draft_cfg(tiny_model_dir, "algo.lr=3e-3", "algo.steps_per_epoch=10", *overrides)
    learner = Learner(cfg, torch.device("cpu"))
    learner.ctx.env.reward = quadratic_reward()
    before = learner.policy.trainable_state_dict()
    first = learner.update()
    second = learner.update()
    assert first["train/optimizer_steps"] == 10
    assert first["perf/samples"] == 10 * 4 * (2 if "algo.variant=lv" in overrides else 1)
    assert second["reward/mean"] > first["reward/mean"]
    assert all(
        not torch.equal(before[k], v) for k, v in learner.policy.trainable_state_dict().items() if "lora_A" not in k
    )
    if "algo.aux_loss_weight=0.5" in overrides:
        assert second["draft/aux_loss"] > 0


def test_lora_adapters_change_alone_and_round_trip_through_safetensors(tiny_model_dir, tmp_path):
    cfg = draft_cfg(tiny_model_dir, "policy.lora_rank=4", "algo.lr=1e-2", "algo.steps_per_epoch=3")
    learner = Learner(cfg, torch.device("cpu"))
    policy = learner.policy
    weights = policy.trainable_state_dict()
    assert weights and all("lora_" in k for k in weights)
    frozen_before = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" not in k}
    adapters_before = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" in k}
    learner.update()
    after = policy.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())  # the base weights never move
    assert any(not torch.equal(after[k], v) for k, v in adapters_before.items())

    path = tmp_path / "adapters.safetensors"
    save_adapters(policy, path)
    fresh = build_policy(cfg, torch.device("cpu"))[0]
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([500, 20])
    with torch.no_grad():
        assert not torch.allclose(fresh(x, t, torch.zeros(2, 0)), policy(x, t, torch.zeros(2, 0)))
        load_adapters(fresh, path)
        torch.testing.assert_close(fresh(x, t, torch.zeros(2, 0)), policy(x, t, torch.zeros(2, 0)))
    # a rollout worker built from the same config takes the learner's trainable weights as they are
    worker = RolloutWorker(cfg)
    worker.set_weights(policy.trainable_state_dict(), 1)

    merged = merge_adapters(copy.deepcopy(policy.unet))
    base = load_ddpm(str(tiny_model_dir))[0]
    assert set(merged.state_dict()) == set(base.state_dict())  # a plain diffusers model again
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t).sample, policy(x, t, torch.zeros(2, 0)), rtol=1e-4, atol=1e-5)
    merged.save_pretrained(tmp_path / "export", safe_serialization=True)
    assert (tmp_path / "export" / "diffusion_pytorch_model.safetensors").exists()

    wrong = build_policy(draft_cfg(tiny_model_dir, "policy.lora_rank=2"), torch.device("cpu"))[0]
    with pytest.raises((KeyError, RuntimeError), match="lora"):
        load_adapters(wrong, path)


def test_lora_names_missing_target_modules(tiny_model_dir):
    with pytest.raises(ValueError, match=r"\['to_qq'\] match no module"):
        build_policy(draft_cfg(tiny_model_dir, "policy.lora_rank=2", "policy.lora_target_modules=[to_qq]"), "cpu")


def test_config_checks_for_draft(monkeypatch):
    validate(compose(["algo=draft", "algo.k=1"]))
    validate(compose(["algo=draft", "algo.variant=lv"]))
    validate(compose(["algo=draft", "trainer.samples_per_epoch=7"]))  # DDPO's sizes do not apply
    with pytest.raises(ConfigError, match="is not differentiable"):
        validate(compose(["algo=draft", "reward=jpeg_compressibility"]))
    with pytest.raises(ConfigError, match="algo.variant=bogus is out of range: algo.variant takes one of full, lv"):
        validate(compose(["algo=draft", "algo.variant=bogus"]))
    with pytest.raises(ConfigError, match="differentiates one step only; drop algo.k=3"):
        validate(compose(["algo=draft", "algo.variant=lv", "algo.k=3"]))
    with pytest.raises(ConfigError, match="policy.lora_rank=-1"):
        validate(compose(["algo=draft", "policy.lora_rank=-1"]))


def test_single_process_lv_run_with_lora_saves_adapters_only(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    run_dir = main(
        [
            f"env.base_model={tiny_model_dir}",
            f"logging.run_dir={tmp_path / 'run'}",
            "trainer.epochs=2",
            "algo.steps_per_epoch=2",
            "algo.variant=lv",
            "policy.lora_rank=2",
            "ray.enabled=false",
            "eval.every=1",
            *TINY,
        ]
    )
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines if "eval/reward_mean" in m] == [0, 1, 2]
    trained = [m for m in lines if "policy_version" in m]
    assert all({"loss/policy", "reward/mean", "train/grad_norm"} <= set(m) for m in trained)
    # throughput counts what the learner sampled (2 steps x a batch of 4 x 2 LV copies), not trainer.samples_per_epoch
    assert all(m["perf/samples"] == 2 * 4 * 2 for m in trained)
    assert all(m["perf/samples_per_s"] == pytest.approx(16 / m["perf/epoch_s"]) for m in trained)
    saved = load_file(str(run_dir / "final" / "policy.safetensors"))
    assert saved and all("lora_" in k for k in saved)


@pytest.mark.slow
def test_draft_runs_through_real_ray(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_rlft(f"env.base_model={tiny_model_dir}", f"logging.run_dir={run_dir}", "trainer.epochs=2",
             "algo.steps_per_epoch=2", "algo.k=1", "ray.num_cpus=4", "eval.every=1", *TINY)  # fmt: skip
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines if "eval/reward_mean" in m] == [0, 1, 2]
    assert (run_dir / "final" / "policy.safetensors").exists()


def test_lora_works_for_ddpo_too(tiny_model_dir):
    from tests.helpers import tiny_cfg

    cfg = tiny_cfg(tiny_model_dir, "policy.lora_rank=2", "algo.lr=1e-2")
    worker, learner = RolloutWorker(cfg), Learner(cfg, torch.device("cpu"))
    frozen = {k: v.clone() for k, v in learner.policy.state_dict().items() if "lora_" not in k}
    learner.ingest([("batch-0", worker.collect(0, seed=3, n=16))])
    learner.update()
    after = learner.policy.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    weights = learner.policy.trainable_state_dict()
    assert all("lora_" in k for k in weights) and any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    worker.set_weights(weights, 1)
    assert worker.collect(1, seed=3, n=8)["reward_finite"].all()


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_lora_sampling_scale_interpolates_the_rollout_policy_towards_the_base(tiny_model_dir, scale):
    """DRaFT's LoRA scaling: rollouts sample with the adapters' update times policy.lora_sampling_scale (0: the base
    model itself); learners train the adapters at full scale."""
    from tests.helpers import tiny_cfg

    cfg = tiny_cfg(tiny_model_dir, "policy.lora_rank=2", f"policy.lora_sampling_scale={scale}")
    worker, learner = RolloutWorker(cfg), Learner(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    weights = {k: torch.randn_like(v) * 0.5 for k, v in learner.policy.trainable_state_dict().items()}
    learner.policy.load_trainable_state_dict(weights)
    worker.set_weights(weights, 1)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([500, 100])
    context = torch.zeros(2, 0)
    with torch.no_grad():
        base = learner.policy.reference_forward(x, t, context)
        full = learner.policy(x, t, context)
        sampled = worker.policy(x, t, context)
    assert (full - base).abs().max() > 1e-3  # the adapters do change the network
    if scale == 0.0:
        torch.testing.assert_close(sampled, base)
    else:  # strictly between the base and the fully adapted network, not either of them
        assert (sampled - base).abs().max() > 1e-4 and (sampled - full).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="policy.lora_sampling_scale scales LoRA adapters"):
        validate(compose([f"env.base_model={tiny_model_dir}", "policy.lora_sampling_scale=0.5"]))
