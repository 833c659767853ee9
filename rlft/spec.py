"""The typed run spec: every key of `python -m rlft.run`, its default, its comment and its limits, in one place.

`rlft.config.compose` merges the command line into these dataclasses (Hydra structured configs) and returns a
`RunSpec`; every constructor then takes its own section (`spec.trainer`, `spec.ray`, ...). The `algo`, `env` and
`reward` sections are the chosen group's dataclass: the algorithm's `Config` (algorithms/<name>.py), the env kind's
config (envs/tasks.py) and the reward's config (envs/rewards.py, envs/reward_models.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import II, MISSING

from rlft.core.spec import knob

# LoRA targets by network family: a diffusers UNet's attention, ResNet convolutions and time embeddings; SD3's MMDiT
# attention on both streams (image and text), as Flow-GRPO adapts it
LORA_TARGETS = {"unet": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"],
                "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]}


@dataclass
class PolicySpec:
    lora_rank: int = knob(0, "LoRA rank of the adapters on the network (peft); 0 = full fine-tuning", ge=0)
    lora_alpha: float = knob(8.0, "LoRA scale: the adapter's update is multiplied by lora_alpha / lora_rank", gt=0)
    lora_dropout: float = knob(0.0, "dropout on the LoRA branch's input during training", ge=0, lt=1)
    lora_sampling_scale: float = knob(1.0, "rollouts and evaluations scale the adapters' update by this (DRaFT's LoRA "
                                      "scaling: < 1 trades reward for staying near the base model)", ge=0)  # fmt: skip
    lora_target_modules: list[str] | None = knob(None, "layers that get adapters (last path components); null = the "
                                                 "network family's (rlft.spec.LORA_TARGETS)")  # fmt: skip
    gradient_checkpointing: bool | None = knob(None, "recompute each network call in the backward pass; null = the "
                                               "algorithm's default (on for DRaFT)")  # fmt: skip
    dtype: str = knob("fp32", "network compute (the step maths and log-probabilities stay fp32)",
                      choices=("fp32", "bf16"))  # fmt: skip
    channels_last: bool = knob(False, "NHWC memory format for the network (faster convolutions on GPUs)")
    compile: bool = knob(False, "torch.compile the network (minutes of compilation; pays off on long GPU runs)")
    fused_norm_silu: bool = knob(False, "GPU, with compile and channels_last: group norm + SiLU through rlft's "
                                 "Triton kernels")  # fmt: skip


@dataclass
class TrainerSpec:
    epochs: int = knob(II("algo.epochs"), "rounds of (collect, update, publish); default algo.epochs", ge=1)
    samples_per_epoch: int = knob(64, "trajectories collected per epoch, over all rollout workers", ge=1)
    rollout_batch_size: int = knob(32, "trajectories a rollout worker denoises at once (also DRaFT's batch)", ge=1)
    buffer_capacity: int | None = knob(None, "trajectories the replay buffer holds; null = samples_per_epoch per "
                                       "learner", ge=1)  # fmt: skip
    max_staleness: int = knob(0, "evict trajectories more than this many policy versions old (0 = on-policy)", ge=0)
    # the rollout workers sample epoch e + 1 with version e's weights while the learner trains on epoch e's batch:
    # each update sees data one version old (corrected as each algorithm corrects a stale buffer)
    async_rollouts: bool = knob(False, "overlap the next epoch's collection with this epoch's update (needs "
                                "trainer.max_staleness >= 1)")  # fmt: skip
    lr_schedule: str = knob("constant", "learning rate after the warm-up: constant, or cosine decay to 10%",
                            choices=("constant", "cosine"))  # fmt: skip
    lr_warmup_epochs: int = knob(0, "epochs of linear learning-rate warm-up", ge=0)
    checkpoint_every: int = knob(10, "epochs between checkpoints in <run_dir>/checkpoints/ (and after the last)", ge=1)
    keep_checkpoints: int = knob(3, "newest checkpoints kept; older ones are deleted", ge=1)


@dataclass
class EvalSpec:
    every: int = knob(10, "epochs between evaluations on the fixed seeds (also before the first and after the last)",
                      ge=1)  # fmt: skip
    num_samples: int = knob(64, "samples in the fixed evaluation batch (a multiple of trainer.rollout_batch_size)",
                            ge=1)  # fmt: skip
    seed: int = knob(1234, "seed of the evaluation noise: the same initial noise at every evaluation", ge=0)
    stop_on_hacking_gap: float | None = knob(None, "end the run early (its final weights written) after an evaluation "
                                             "whose eval/hacking_gap exceeds this (the reward's probability of "
                                             "beating the base model minus the judge's); null = never", gt=0,
                                             le=1)  # fmt: skip


@dataclass
class RaySpec:
    enabled: bool = knob(True, "false runs the same loop in this process without Ray (debugging, baselines)")
    address: str | None = knob(None, "Ray cluster to join; null = $RAY_ADDRESS when set, else a new local Ray")
    num_cpus: int | None = knob(None, "logical CPUs of a new local Ray; null = max(4, cores)", ge=1)
    num_rollout_workers: int = knob(2, "rollout actors collecting in parallel; a multiple of num_learners", ge=1)
    num_learners: int = knob(1, "Ray Train workers running the update together (see learner_parallelism)", ge=1)
    learner_parallelism: str = knob("ddp", "how learners share the update: ddp (each holds the whole network) or fsdp "
                                    "(parameters, gradients and optimizer state sharded across them: torch FSDP2, "
                                    "for full fine-tuning of networks too large for one device)",
                                    choices=("ddp", "fsdp"))  # fmt: skip
    cpus_per_rollout_worker: float = knob(1.0, "logical CPUs reserved per rollout actor", ge=0)
    gpus_per_rollout_worker: float = knob(0.0, "GPUs (fractions allowed) per rollout actor", ge=0)
    gpus_per_learner: float = knob(0.0, "GPUs per learner; > 0 makes Ray Train use CUDA and NCCL", ge=0)
    rollout_resources: dict[str, float] = knob({}, "custom Ray resources each rollout actor also takes (a node "
                                               "label: ray.rollout_resources.rollout_node=1 keeps them on the "
                                               "nodes that offer it)", ge=0)  # fmt: skip
    learner_resources: dict[str, float] = knob({}, "custom Ray resources each learner also takes (Ray Train's "
                                               "resources_per_worker), as ray.rollout_resources", ge=0)  # fmt: skip
    rollout_threads: int | None = knob(None, "torch threads per rollout worker; null = cores / num_rollout_workers",
                                       ge=1)  # fmt: skip
    learner_threads: int | None = knob(None, "torch threads per learner; null = cores / num_learners", ge=1)
    max_rollout_restarts: int = knob(3, "a crashed or hung rollout actor is restarted (its call retried) this often",
                                     ge=0)  # fmt: skip
    max_learner_failures: int = knob(1, "Ray Train restarts failed learners this often, from the newest checkpoint",
                                     ge=0)  # fmt: skip
    collect_timeout_s: float = knob(1800.0, "seconds a rollout call may take before its actor counts as hung and is "
                                    "replaced", gt=0)  # fmt: skip
    remote_reward: bool = knob(False, "score rewards in the run's own Ray actor (heavy reward models stay out of "
                               "the rollout workers; no gradients)")  # fmt: skip
    reward_actors: int = knob(1, "reward actors in the pool (ray.remote_reward); rollout worker i calls actor i "
                              "mod reward_actors, which scores the calls arriving together as one batch", ge=1)
    reward_gpus: float = knob(0.0, "GPUs (fractions allowed) of each reward actor; 0 = they run on CPU", ge=0)
    reward_batch_window_s: float = knob(0.005, "a reward actor waits this long after a call for others to batch "
                                        "with it", ge=0)  # fmt: skip
    reward_batch_size: int = knob(32, "images the reward actor scores at once (bounds its memory)", ge=1)
    reward_timeout_s: float = knob(300.0, "seconds a reward call may take before the reward actor counts as hung "
                                   "and is replaced", gt=0)  # fmt: skip
    max_reward_restarts: int = knob(3, "a crashed or hung reward actor is restarted (its call retried) this often",
                                    ge=0)  # fmt: skip
    reward_actor: str | None = knob(None, "set by rlft when it starts the reward actors (their names' prefix); "
                                    "leave null")  # fmt: skip


@dataclass
class LoggingSpec:
    run_dir: str | None = knob(None, "run folder; null = runs/<algo>-<env>-<reward>-<date>-<time>")
    wandb: str = knob("offline", "wandb mode", choices=("offline", "online", "disabled"))
    wandb_project: str = knob("rlft", "wandb project name")
    wandb_name: str | None = knob(None, "wandb run name; null = the run folder's name")
    wandb_group: str | None = knob(None, "wandb group (a Tune sweep puts its trials in one group)")
    progress: bool = knob(True, "show a progress bar")


DEVICE_WORDS = "cpu, cuda, cuda:<index> or auto (cuda when one is visible)"


@dataclass
class RunSpec:
    """A whole run: `python -m rlft.run` composes one of these before anything starts."""

    seed: int = knob(0, "master seed: rollout noise, minibatch order and initialisation all derive from it", ge=0)
    device: str = knob("auto", f"where policies run: {DEVICE_WORDS}")
    resume: str | None = knob(None, "continue a run: its folder, or auto (the newest run with this config's hash)")
    algo: Any = MISSING  # the algorithm's Config (algo=<name>)
    env: Any = MISSING  # the env's config (env=<preset>)
    reward: Any = MISSING  # the reward's config (reward=<name>)
    judge: Any = MISSING  # the evaluation judge's config (judge=<name>: none, or any reward the update never sees)
    policy: PolicySpec = knob(PolicySpec(), "the network: LoRA, precision, layout, compilation")
    trainer: TrainerSpec = knob(TrainerSpec(), "the epoch loop: sizes, schedule, checkpoints")
    eval: EvalSpec = knob(EvalSpec(), "the fixed evaluation")
    ray: RaySpec = knob(RaySpec(), "processes and their resources")
    logging: LoggingSpec = knob(LoggingSpec(), "where the run's outputs go")
