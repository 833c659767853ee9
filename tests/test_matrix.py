"""The algorithm x env x reward matrix through the command line, on tiny models of the real classes saved in the real
folder layouts, with relative run folders: every cell either runs (and leaves its checkpoint and final weights in its
run folder) or is refused before anything starts with a one-line reason. Which cells run is stated here, from what
each reward and algorithm needs, independently of the code's own checks; the test fails when the code disagrees.

The flow-matching envs (digits_flow: the shipped model; flow: a tiny velocity UNet2DModel with SD3's scheduler class;
sd35_medium: a tiny StableDiffusion3Pipeline folder) have rows like the DDPM envs'; GRPO and NFT run on every env with
its default reward (NFT only on flows). Most cells
run in this process (ray.enabled=false); tests/test_matrix_ray.py runs DDPO, DRaFT and Adjoint Matching on the tiny
celebahq-layout DDPM and the tiny SD 1.5 folder through real Ray, and one cell of every env family.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlft.checkpoint import Checkpoint, committed
from rlft.run import main

ALGOS = ["ddpo", "draft", "adjoint_matching", "deft"]
ENVS = ["digits", "digits_flow", "digits_sr", "digits_inpaint", "celebahq", "church", "cifar10", "sd15",
        "flowers102_sr"]  # fmt: skip
# GRPO and NFT (and the generic flow env) run on each env with its own default reward: their code paths are
# DDPO's rollouts and the flow sampler, which the full rows above already cross with every reward
GROUP_ALGOS = ["grpo", "nft"]
DEFAULT_REWARD = {"digits": "digit", "digits_flow": "digit", "flow": "digit", "digits_sr": "measurement",
                  "digits_inpaint": "measurement", "celebahq": "over50", "church": "aesthetic",
                  "cifar10": "jpeg_compressibility", "sd15": "pickscore", "sd35_medium": "pickscore",
                  "flowers102_sr": "measurement"}  # fmt: skip
REWARDS = ["digit", "jpeg_compressibility", "jpeg_incompressibility", "measurement", "perceptual", "python",
           "aesthetic", "over50", "under30", "clip_score", "pickscore", "image_reward"]  # fmt: skip

# what each reward can score, in words the matrix states (not read from the code)
PIXEL_16_GRAY = {"digit", "perceptual"}  # the digit classifier and its features: 1-channel 16 px images
ANY_IMAGE = {"jpeg_compressibility", "jpeg_incompressibility", "python"}
RGB_BACKBONES = {"aesthetic", "over50", "under30"}  # CLIP / ViT backbones: RGB (or gray) images, any size >= 16
NEEDS_PROMPTS = {"clip_score", "pickscore", "image_reward"}
NEEDS_MEASUREMENT = {"measurement"}
NOT_DIFFERENTIABLE = {"jpeg_compressibility", "jpeg_incompressibility"}
FLOW_ENVS = {"digits_flow", "flow", "sd35_medium"}
ENV_IMAGES = {"digits": "gray16", "digits_flow": "gray16", "flow": "gray16", "digits_sr": "gray16",
              "digits_inpaint": "gray16", "celebahq": "rgb16",
              "church": "rgb16", "cifar10": "rgb16", "sd15": "rgb32", "sd35_medium": "rgb32",
              "flowers102_sr": "rgb16"}  # fmt: skip
MEASURED = {"digits_sr", "digits_inpaint", "flowers102_sr"}
PROMPTED = {"sd15", "sd35_medium"}


def reward_fits(env: str, reward: str) -> bool:
    images = ENV_IMAGES[env]
    if reward in NEEDS_PROMPTS:
        return env in PROMPTED
    if reward in NEEDS_MEASUREMENT:
        return env in MEASURED
    if reward in PIXEL_16_GRAY:
        return images == "gray16"
    return reward in ANY_IMAGE or reward in RGB_BACKBONES


def refusals(algo: str, env: str, reward: str) -> list[str]:
    """Why a cell cannot run (phrases of its possible refusals; the first check that fails gives its message), or []
    when it runs."""
    reasons = []
    if not reward_fits(env, reward):
        reasons.append(f"reward={reward} cannot score env={env}")
    if algo in ("draft", "adjoint_matching", "deft") and reward in NOT_DIFFERENTIABLE:
        reasons.append("is not differentiable")
    if algo == "deft" and env == "sd15":
        reasons.append("algo=deft trains a small h-transform beside a frozen pixel-space DDPM")
    if algo == "deft" and env in FLOW_ENVS:
        reasons.append("are written for the DDIM transitions of a DDPM")
    if algo == "nft" and env not in FLOW_ENVS:
        reasons.append("algo=nft regresses velocities on the rectified-flow path")
    return reasons


CELLS = [(algo, env, reward) for algo in ALGOS for env in ENVS for reward in REWARDS]
# the generic flow env and SD 3.5 with their default rewards: the rewards' code paths are those of digits_flow and sd15
DEFAULT_ROWS = ["flow", "sd35_medium"]
CELLS += [(algo, env, DEFAULT_REWARD[env]) for algo in ALGOS for env in DEFAULT_ROWS]
CELLS += [(algo, env, DEFAULT_REWARD[env]) for algo in GROUP_ALGOS for env in [*ENVS, *DEFAULT_ROWS]]
RUNNABLE = [cell for cell in CELLS if not refusals(*cell)]
REFUSED = [cell for cell in CELLS if refusals(*cell)]

TINY = ["env.num_inference_steps=2", "trainer.rollout_batch_size=2", "trainer.samples_per_epoch=2",
        "ray.num_rollout_workers=1", "eval.num_samples=2", "eval.every=1", "trainer.epochs=1",
        "trainer.checkpoint_every=1", "ray.rollout_threads=1", "ray.learner_threads=1", "logging.wandb=disabled",
        "logging.progress=false", "device=cpu", "ray.enabled=false"]  # fmt: skip
ALGO_OVERRIDES = {"ddpo": ["algo.minibatch_size=2"], "draft": [],
                  "grpo": ["algo.minibatch_size=2", "algo.group_size=2"],
                  "nft": ["algo.minibatch_size=2", "algo.group_size=2"],
                  "adjoint_matching": ["algo.minibatch_size=2", "algo.passes_per_buffer=1"],
                  "deft": ["algo.minibatch_size=2", "algo.passes=1"]}  # fmt: skip


def cell_overrides(algo: str, env: str, reward: str, models: dict[str, Path]) -> list[str]:
    env_keys = {
        "celebahq": [f"env.base_model={models['rgb_ddpm']}"], "church": [f"env.base_model={models['rgb_ddpm']}"],
        "cifar10": [f"env.base_model={models['rgb_ddpm']}"], "flow": [f"env.base_model={models['flow']}"],
        "sd15": [f"env.base_model={models['sd']}", "env.resolution=32", "env.guidance_scale=2.0"],
        "sd35_medium": [f"env.base_model={models['sd3']}", "env.resolution=32", "env.guidance_scale=2.0",
                        "env.max_sequence_length=8"],
        "flowers102_sr": [f"env.base_model={models['rgb_ddpm']}", f"env.data_root={models['flowers']}",
                          "env.image_size=16"],
    }.get(env, [])  # fmt: skip
    reward_keys = {
        "python": ["reward.function=tests.matrix_rewards:brightness", "reward.differentiable=true"],
        "aesthetic": [f"reward.clip_model={models['clip']}", f"reward.head_path={models['head']}"],
        "over50": [f"reward.classifier={models['age']}"], "under30": [f"reward.classifier={models['age']}"],
        "clip_score": [f"reward.clip_model={models['clip_with_tokenizer']}"],
        "pickscore": [f"reward.model={models['pickscore_model']}",
                      f"reward.processor={models['pickscore_processor']}"],
        "image_reward": [f"reward.model={models['image_reward']}",
                         f"reward.tokenizer={models['image_reward_tokenizer']}"],
    }.get(reward, [])  # fmt: skip
    judge_keys = []
    if env in PROMPTED:  # its judge (image_reward by default) on the tiny models too, or another when it is the reward
        judge_keys = (["judge=clip_score", f"judge.clip_model={models['clip_with_tokenizer']}"] if reward ==
                      "image_reward" else [f"judge.model={models['image_reward']}",
                                           f"judge.tokenizer={models['image_reward_tokenizer']}"])  # fmt: skip
    # 2 steps end with a stochastic step onto t ~ 0 (flows: 1 -> 0.001 -> 0; DDIM: 500 -> 0 -> x_0), of std below
    # DDPO's and GRPO's min_step_std: they, and every algorithm on the flows, get a step more
    steps = ["env.num_inference_steps=3"] if env in FLOW_ENVS or algo in ("ddpo", "grpo") else []
    return [f"algo={algo}", f"env={env}", f"reward={reward}", *env_keys, *reward_keys, *judge_keys, *TINY, *steps,
            *ALGO_OVERRIDES[algo]]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run from a fresh working directory, as a user does: run folders are relative to it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def check_run_folder(run_dir: Path) -> None:
    """What every run leaves: its checkpoint, finite final weights, one metrics line per epoch and evaluation."""
    assert [p.name for p in committed(run_dir / "checkpoints")] == ["epoch_000001"]
    Checkpoint.open(committed(run_dir / "checkpoints")[0])
    weights = load_file(str(run_dir / "final" / "policy.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines if "policy_version" in m] == [1]
    assert sorted(m["epoch"] for m in lines if "eval/reward_mean" in m) == [0, 1]


@pytest.mark.parametrize("algo, env, reward", RUNNABLE, ids=["-".join(cell) for cell in RUNNABLE])
def test_a_runnable_cell_runs_through_the_cli_into_its_relative_run_folder(algo, env, reward, tiny_models, in_tmp):
    run_dir = main([*cell_overrides(algo, env, reward, tiny_models), "logging.run_dir=runs/cell"])
    assert run_dir == (in_tmp / "runs" / "cell").resolve()
    check_run_folder(run_dir)


@pytest.mark.parametrize("algo, env, reward", REFUSED, ids=["-".join(cell) for cell in REFUSED])
def test_every_other_cell_is_refused_before_anything_starts_with_its_reason(algo, env, reward, tiny_models, in_tmp):
    with pytest.raises(SystemExit) as stopped:
        main([*cell_overrides(algo, env, reward, tiny_models), "logging.run_dir=runs/cell"])
    message = str(stopped.value.code)
    assert message.startswith("rlft: ") and "\n" not in message, message
    assert any(reason in message for reason in refusals(algo, env, reward)), message
    assert not (in_tmp / "runs").exists()


def test_the_matrix_covers_every_algorithm_and_env_and_the_done_when_cells():
    for algo in ALGOS + GROUP_ALGOS:
        assert sum(cell[0] == algo for cell in RUNNABLE) >= 2, algo
    for env in [*ENVS, *DEFAULT_ROWS]:
        assert any(cell[1] == env for cell in RUNNABLE), env
    for algo in ("ddpo", "draft", "adjoint_matching", "grpo", "nft"):  # the SD3-class env runs every flow algorithm
        assert (algo, "sd35_medium", "pickscore") in RUNNABLE
    for algo in ("ddpo", "draft", "adjoint_matching", "grpo", "nft"):  # every flow-capable algorithm on the flow
        assert (algo, "digits_flow", "digit") in RUNNABLE
    for algo in ("ddpo", "draft", "adjoint_matching"):
        assert (algo, "sd15", "image_reward") in RUNNABLE and (algo, "celebahq", "over50") in RUNNABLE
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # every model here is a local folder: nothing downloads
