"""DEFT: fine-tuning a frozen diffusion model for an inverse problem by learning a small h-transform network.

Denker et al. 2024, "DEFT: Efficient Fine-Tuning of Diffusion Models by Learning the Generalised h-Transform"
(arXiv 2406.01781). The base noise prediction eps_theta stays frozen; the policy predicts eps_theta + h_phi, and
only the small h-net h_phi trains. Its target is the posterior p(x_0 | y) ~ p_base(x_0) p(y | x_0), with
log p(y | x_0) the env's reward (the measurement log-likelihood -|A(x_0) - y|^2 / (2 sigma_y^2) for envs/inverse.py).
The log-variance variant can target p_base(x_0) p(y | x_0)^lambda instead (`likelihood_weight`): the posterior of a
sharper measurement, which trades sample spread for measurement consistency, as DPS's step size does.

Two variants (`variant`):
- "log_variance" (appendix G.3): VarGrad on trajectories from the replay buffer. In each stochastic DDIM step
  x_{k+1} = mean_k + sigma_k z_k, adding h moves the mean by sigma_k u_k; per trajectory the log Radon-Nikodym
  derivative of the h-process Q against the base P, minus the log-likelihood, is

      L = sum_k [ -1/2 |u_k|^2 + <u^b_k, u_k> + <u_k, z_k> ] - log p(y | x_0)

  with u^b_k the control of the policy that made the trajectory (recovered from the stored noise z_k: the base
  increment (x_{k+1} - mean^base_k) / sigma_k equals u^b_k + z_k). At the optimum Q is the posterior path measure
  and L is the same constant (-log Z(y)) for every trajectory of one measurement y, so the loss is the variance
  of L over the paths of each measurement, pooled over measurements (an env with `samples_per_case` > 1 draws
  each training measurement that many times in a row, and minibatches keep those paths together; with one
  sample per measurement it is the batch variance, which also carries the spread of log Z(y)). The path is
  detached and L is its exact log-density ratio whatever policy made it, so stale buffers give valid gradients
  (Nusken & Richter 2021; Richter et al. 2020, VarGrad). The reference tricks: drop samples whose L exceeds
  `loss_threshold`, and backpropagate through a random `timestep_fraction` of the steps plus the last
  `always_train_last` stochastic steps (the others enter L without gradient).
- "supervised" (sec. 4.1): conditional denoising score matching on pairs (x, y = A(x) + noise),
  |eps_theta(x_t, t) + h_phi(x_t, t, y) - eps|^2. The pairs (`pairs`) are the env's training cases ("data"), or
  ("base") samples x of the frozen base model's own sampler, measured as y = A(x) + sigma_y noise: no ground truth
  at all, and the target is then log-variance's lambda = 1 posterior, p_base(x_0) p(y | x_0), reached by regression
  instead of a path-space variance.

The h-net sees x_t, the Tweedie estimate x0_hat = (x_t - sqrt(1 - a_t) eps_theta) / sqrt(a_t) and the likelihood
gradient g = grad_x log p(y | x) at x0_hat (scaled to unit RMS, its size log rms(g) as a channel of its own), and
adds a learned per-step multiple of g itself: h = body([x_t, x0_hat, g / rms(g), log rms(g)], t) + s_t g, with the
body's last layer and s_t zero at the start (h = 0: the base model). h is zero on deterministic steps (the last
DDIM step onto alpha-bar = 1), where a path density has no room for a control. For the log-variance loss its
output is scaled per step to control units (`control_units`).

Batch schema (log_variance; from `rlft.rollout` with ROLLOUT_KEYS = ("noise", "base_output")):
    latents      [B, T+1, C, H, W]   x_T ... x_0
    noise        [B, T, C, H, W]     z_k of each step of the policy that sampled the trajectory
    base_output  [B, T, C, H, W]     eps_theta(x_k, t_k) of the frozen base network
    context   [B, *m]             the measurement y
    reward    [B]                 log p(y | x_0) (up to a constant, which the variance ignores)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from tensordict import TensorDict
from torch import nn

from rlft.algorithms import LearnerContext, mean_over_steps
from rlft.core.sampler import ddim_step, predict
from rlft.core.spec import knob

REQUIRES_STOCHASTIC_SAMPLER = True  # the path density ratio needs transition densities (env.eta > 0)
REQUIRES_DIFFERENTIABLE_REWARD = True  # the h-net sees the gradient of log p(y | x) (the reward) at x0_hat
GRADIENT_CHECKPOINTING = False
# the step noises z_k give the behaviour policy's control (off-policy loss); the base network's predictions are
# stored too, so passes over the buffer run only the small h-net
ROLLOUT_KEYS = ("noise", "base_output")
PREPARE_ACROSS_REPLICAS = ()
# the h-net's learning rate when algo.lr is null: log-variance starts at the analytic guidance (guidance_init) and
# only refines it (held-out digits_sr PSNR over three seeds: 20.5-20.7 dB at 3e-4 for 20 epochs, against 19.9-20.2
# from h = 0 at 1e-3 for 40); score matching starts at h = 0 and does better at 1e-3 (about 0.4 dB over 3e-4)
DEFAULT_LR = {"log_variance": 3e-4, "supervised": 1e-3}


@dataclass
class Config:
    name: str = knob("deft", "algorithm module in algorithms/")
    epochs: int = knob(60, "trainer.epochs unless the command line sets it", ge=1)
    variant: str = knob("log_variance", "log_variance (VarGrad on buffered trajectories) or supervised (score "
                        "matching on pairs)", choices=("log_variance", "supervised"))  # fmt: skip
    lr: float | None = knob(None, "AdamW learning rate of the h-net; null: 3e-4 for log_variance, 1e-3 for "
                            "supervised", gt=0)  # fmt: skip
    weight_decay: float = knob(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = knob(1.0, "gradient clipping (global L2 norm) before each optimizer step", gt=0)
    minibatch_size: int = knob(32, "trajectories per optimizer step (the variance is taken over them)", ge=2)
    passes: int = knob(2, "passes over the buffer per epoch (valid off-policy, so reuse is sound)", ge=1)
    timestep_fraction: float = knob(1.0, "random share of the stochastic steps that get gradients; the reference's "
                                    "0.2 saves memory but learned slower here", ge=0, le=1)  # fmt: skip
    always_train_last: int = knob(2, "the last stochastic steps always get gradients", ge=0)
    loss_threshold: float = knob(1.0e5, "samples whose L exceeds this are left out of the variance (reference trick)",
                                 gt=0)  # fmt: skip
    min_kept_fraction: float = knob(0.3, "skip the optimizer step when fewer samples than this share survive",
                                    ge=0, le=1)  # fmt: skip
    hnet_channels: list[int] = knob([8, 16], "h-net UNet levels; [] = s_t g only", ge=1)
    guidance_init: float = knob(1.0, "log_variance: s_t starts at this multiple of the analytic guidance estimate "
                                "(0: h = 0, the base model)", ge=0)  # fmt: skip
    likelihood_weight: float = knob(1.0, "log_variance: lambda, the target is p(x_0) p(y | x_0)^lambda (> 1 sharpens "
                                    "it, as if sigma_y / sqrt(lambda))", gt=0)  # fmt: skip
    supervised_steps: int = knob(50, "supervised variant: optimizer steps per epoch", ge=1)
    supervised_batch_size: int = knob(64, "supervised variant: (x, y, t) triples per optimizer step", ge=1)
    pairs: str = knob("data", "supervised variant: data (the env's training cases) or base (samples of the frozen "
                      "base model, measured anew: no ground truth)", choices=("data", "base"))  # fmt: skip
    base_samples: int = knob(2048, "pairs=base: samples the base model draws once at the start of training", ge=1)

    def __post_init__(self) -> None:
        if self.variant not in DEFAULT_LR:  # before DEFAULT_LR[self.variant] below, which would raise a KeyError
            raise ValueError(f"algo.variant={self.variant} is not one of {', '.join(DEFAULT_LR)}")
        if self.likelihood_weight != 1 and self.variant != "log_variance":
            raise ValueError(f"algo.likelihood_weight={self.likelihood_weight} applies to the log_variance variant; "
                             "score matching learns the posterior of its training pairs (leave it at 1)")
        if self.pairs != "data" and self.variant != "supervised":
            raise ValueError(f"algo.pairs={self.pairs} chooses the supervised variant's training pairs; add "
                             "algo.variant=supervised")  # fmt: skip
        if self.lr is None:
            self.lr = DEFAULT_LR[self.variant]


# ---- the h-transform network ----
class HTransform(nn.Module):
    """h(x_t, t, y) = body([x_t, x0_hat, g / rms(g), log rms(g)], t) + s_t g, g = grad_x log p(y | x) at x0_hat."""

    def __init__(self, sample_shape, schedule, output_scale: torch.Tensor, log_likelihood, channels: list[int]):
        super().__init__()
        from diffusers import UNet2DModel

        c, size, _ = sample_shape
        self.body = None  # no channels: h = s_t g alone, a learned step size on the likelihood gradient
        if channels:
            self.body = UNet2DModel(
                sample_size=size, in_channels=3 * c + 1, out_channels=c, layers_per_block=1,
                block_out_channels=tuple(channels), down_block_types=("DownBlock2D",) * len(channels),
                up_block_types=("UpBlock2D",) * len(channels), norm_num_groups=min(8, channels[0]),
            )  # fmt: skip
            nn.init.zeros_(self.body.conv_out.weight)
            nn.init.zeros_(self.body.conv_out.bias)
        self.schedule = schedule.to("cpu")  # the sampler's: its timesteps, and how to read the base network
        self.guidance_scale = nn.Parameter(torch.zeros(schedule.num_steps))  # s_t, one per sampler step
        self.register_buffer("timesteps", schedule.timesteps.long().cpu(), persistent=False)  # [T]
        self.register_buffer("output_scale", output_scale.float(), persistent=False)  # [T] see control_units
        self.log_likelihood = log_likelihood  # (x [B, C, H, W], y [B, *m]) -> [B], differentiable in x

    def likelihood_gradient(self, x0_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x0_hat.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(self.log_likelihood(x, y).sum(), x)
        return gradient

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, base_output: torch.Tensor):
        step = (timestep.view(-1, 1) == self.timesteps.view(1, -1)).float().argmax(1)  # [B] sampler step index
        if not bool((self.timesteps[step] == timestep).all()):
            raise ValueError("the h-net was built for the sampler's timesteps; got a timestep outside the schedule")
        _, x0_hat = predict(self.schedule, step.cpu(), base_output.detach(), x_t)  # Tweedie's, under the base model
        gradient = self.likelihood_gradient(x0_hat, context)
        h = self.guidance_scale[step].view(-1, 1, 1, 1) * gradient
        if self.body is not None:
            rms = gradient.pow(2).flatten(1).mean(1).sqrt().view(-1, 1, 1, 1) + 1e-8
            # the direction g / rms(g) alone hides how far x0_hat is from the measurement; log rms(g) tells the body
            size = rms.log().expand(-1, 1, *x_t.shape[2:])
            h = h + self.body(torch.cat([x_t, x0_hat, gradient / rms, size], dim=1), timestep).sample
        return h * self.output_scale[step].view(-1, 1, 1, 1)


def make_correction(cfg: Config, env) -> HTransform:
    """The h-net for `env` (called by rlft.rollout.build_policy on learners and rollout workers alike)."""
    needs = {"data": "cases", "base": "operator"}[cfg.pairs]  # the base model's pairs need only A and sigma_y
    if cfg.variant == "supervised" and not hasattr(env, needs):
        raise ValueError("algo.variant=supervised trains on (x, y) pairs of an inverse-problem env; use "
                         "env=digits_sr or env=digits_inpaint, or algo.variant=log_variance")  # fmt: skip
    weight = cfg.likelihood_weight

    def log_likelihood(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return weight * env.reward(x, **env.reward_context(y))  # the target's log-likelihood: lambda log p(y | x)

    # score matching regresses h in the units of the noise prediction; only the path loss wants control units
    scale = control_units(env.schedule) if cfg.variant == "log_variance" else control_units(env.schedule).sign()
    correction = HTransform(env.sample_shape, env.schedule, scale, log_likelihood, cfg.hnet_channels)
    if cfg.guidance_init and cfg.variant == "log_variance":  # score matching starts at h = 0, as the paper's
        estimate = guidance_estimate(env, weight)
        with torch.no_grad():  # s_t scale_t g = guidance_init * estimate_t g; only the starting point moves
            correction.guidance_scale.copy_(cfg.guidance_init * estimate / scale.where(scale != 0, 1.0))
    return correction


def guidance_estimate(env, likelihood_weight: float = 1.0) -> torch.Tensor:
    """[T] c_t with h = c_t g ~ -sqrt(1 - a_t) grad_{x_t} log p(y | x_t): Tweedie plus a Gaussian p(x_0 | x_t) of
    per-pixel variance r_t = (1 - a_t) / a_t, so p(y | x_t) ~ N(A x0_hat, sigma_y^2 + kappa r_t) with kappa the
    variance of A(z) - A(0) for white z; then c_t = -sqrt(r_t) sigma_y^2 / (sigma_y^2 + kappa r_t), with sigma_y /
    sqrt(likelihood_weight) for the sharpened target (g is then the gradient of its log-likelihood too).
    0 on deterministic steps and on the last stochastic step, whose noise is so small (see control_units) that the
    estimate there is a control of size ~|g| / 0.04 per pixel: trained h-nets leave s_t ~ 0 on that step."""
    schedule = env.schedule
    if not (hasattr(env, "operator") and hasattr(env, "sigma_y")):
        return torch.zeros(schedule.num_steps)  # not an inverse-problem env: no estimate, s_t starts at 0
    operator, sigma_y = env.operator, float(env.sigma_y) / likelihood_weight**0.5  # the target's likelihood
    z = torch.randn((64, *env.sample_shape), generator=torch.Generator().manual_seed(0))
    kappa = (operator(z) - operator(torch.zeros_like(z))).float().var().item()
    a = schedule.alpha_prod.cpu().double()
    ratio = (1 - a) / a
    estimate = -ratio.sqrt() * sigma_y**2 / (sigma_y**2 + kappa * ratio)
    mask = torch.zeros(schedule.num_steps, dtype=torch.bool)
    mask[schedule.stochastic_steps.cpu()[:-1]] = True  # not the last stochastic step: see the docstring
    return torch.where(mask, estimate, 0.0).float()


def control_units(schedule) -> torch.Tensor:
    """[T] per sampler step, the h that moves the step's mean by one standard deviation of its noise (u_k = 1), and 0
    on deterministic steps. The h-net's outputs are multiplied by it, so they are controls u_k in units of the step
    noise: a reparameterisation that leaves the loss as it is. It matters at the last stochastic step onto alpha-bar
    ~ 1, whose noise is tiny (std ~0.006 for 10 DDIM steps): there one unit of h is a control ~27x that of the other
    steps, so equal optimizer steps on every step's h made that step's control energy, and L, blow up."""
    scale = torch.zeros(schedule.num_steps)
    schedule = dataclasses.replace(schedule.to("cpu"), prediction_type="epsilon", clip_sample_range=None)
    for k in schedule.stochastic_steps.tolist():
        eps = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)  # two noise predictions one unit apart
        step = ddim_step(schedule, k, eps, torch.zeros_like(eps), noise=torch.zeros_like(eps))
        scale[k] = (step.std[0] / (step.mean[1] - step.mean[0]).abs()).item()
    return scale


# ---- the losses ----
def log_variance_loss(
    control: torch.Tensor, behaviour_control: torch.Tensor, noise: torch.Tensor, log_likelihood: torch.Tensor,
    loss_threshold: float = float("inf"), groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """VarGrad loss of DEFT (Denker et al. 2024, app. G.3, eq. for log dQ/dP) over one batch of detached paths.

    control, behaviour_control, noise: [B, K, D] per stochastic step (u_k, u^b_k, z_k); log_likelihood: [B];
    groups: [B] the measurement each path belongs to (None: all one measurement).
        L_i = sum_k (-1/2 |u_k|^2 + <u^b_k, u_k> + <u_k, z_k>) - log p(y | x_0)
        loss = sum_i (L_i - mean_{g(i)} L)^2 / (n - #groups) over the samples with L_i <= loss_threshold
    i.e. the variance of L within each measurement's group, pooled (one group: the batch variance). App. G.3
    takes the variance over paths of ONE measurement: at the h-transform L_i = -log Z(y_i), constant per
    measurement but not across them, so a variance over mixed measurements keeps Var_y log Z(y), which no h
    can remove and which only adds noise to the gradient.
    Returns the loss and per-sample values (`objective` [B] and the `kept` mask [B]).
    """
    log_rnd = (-0.5 * control.pow(2) + behaviour_control * control + control * noise).sum(dim=(1, 2))  # [B]
    objective = log_rnd - log_likelihood
    kept = objective.detach() <= loss_threshold
    groups = torch.zeros_like(kept, dtype=torch.long) if groups is None else groups
    _, group = torch.unique(groups[kept], return_inverse=True)  # [n] 0 .. #groups - 1
    values = objective[kept]
    num_groups = int(group.max()) + 1 if len(values) else 0
    size = torch.zeros(num_groups, device=values.device).index_add_(0, group, torch.ones_like(values))
    mean = torch.zeros(num_groups, device=values.device).index_add_(0, group, values) / size
    dof = len(values) - num_groups
    loss = (values - mean[group]).pow(2).sum() / dof if dof > 0 else objective.sum() * 0.0
    return loss, {"objective": objective.detach(), "kept": kept, "log_rnd": log_rnd.detach()}


def supervised_loss(prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Conditional denoising score matching (DEFT sec. 4.1): E |eps_theta + h_phi - eps|^2 (mean per dimension)."""
    return (prediction.float() - noise.float()).pow(2).mean()


# ---- the updates ----
def optimizer_step(ctx: LearnerContext, cfg: Config) -> dict[str, float]:
    """Average the h-net's gradients over learner replicas, then clip and step (ctx.optimizer_step).

    The log-variance loss sums over all steps of a path before one backward, which DDP's one-forward-one-backward
    hooks do not allow, so the updates call the unwrapped policy and all-reduce the (small) h-net gradients here.
    """
    if ctx.world_size > 1:
        import torch.distributed as dist

        for p in ctx.policy.correction.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= ctx.world_size
    return ctx.optimizer_step(cfg.max_grad_norm)


def controls(ctx: LearnerContext, batch: TensorDict, train_steps: set[int]) -> tuple[torch.Tensor, ...]:
    """u_k (with gradients on `train_steps`), u^b_k and z_k for every stochastic step: each [B, K, D]."""
    policy, schedule = ctx.policy, ctx.policy.schedule
    latents, context = batch["latents"], batch["context"]
    control, behaviour, noises = [], [], []
    for k in schedule.stochastic_steps.tolist():
        x_t, x_next = latents[:, k], latents[:, k + 1]
        timestep = schedule.timesteps[k].expand(x_t.shape[0])
        base_eps = batch["base_output"][:, k].float()
        base = ddim_step(schedule, k, base_eps, x_t, prev_sample=x_next)
        with torch.set_grad_enabled(k in train_steps):
            eps = policy(x_t, timestep, context, base_output=base_eps)
            mean = ddim_step(schedule, k, eps, x_t, prev_sample=x_next).mean
        std = base.std
        control.append(((mean - base.mean) / std).flatten(1))  # u_k: the mean shift in units of the step noise
        behaviour.append(((x_next.float() - base.mean) / std - batch["noise"][:, k].float()).flatten(1))  # u^b_k
        noises.append(batch["noise"][:, k].float().flatten(1))
    return torch.stack(control, 1), torch.stack(behaviour, 1), torch.stack(noises, 1)


def per_measurement(ctx: LearnerContext) -> bool:
    """Whether the env samples each training measurement several times, so L is compared within measurements."""
    return getattr(ctx.env, "samples_per_case", 1) > 1


def measurement_groups(batch: TensorDict) -> torch.Tensor:
    """[B] an index of each path's measurement y (paths with equal contexts share it)."""
    return torch.unique(batch["context"].flatten(1), dim=0, return_inverse=True)[1]


def measurement_minibatches(ctx: LearnerContext, size: int):
    """One pass over the buffer in minibatches of whole measurement groups, the groups in random order (the buffer's
    own shuffle would scatter a measurement's samples over minibatches, leaving nothing to compare them with)."""
    contents = ctx.buffer.contents()
    group = measurement_groups(contents)
    rank = torch.randperm(int(group.max()) + 1, generator=ctx.generator)[group]
    order = torch.sort(rank, stable=True).indices
    for i in range(ctx.minibatch_count(size)):
        yield contents[order[i * size : (i + 1) * size]].to(ctx.device)


def log_variance_step(ctx: LearnerContext, batch: TensorDict, cfg: Config) -> dict[str, float]:
    steps = ctx.policy.schedule.stochastic_steps.tolist()
    num_random = round(cfg.timestep_fraction * len(steps))
    order = torch.randperm(len(steps), generator=ctx.generator).tolist()
    train_steps = {steps[i] for i in order[:num_random]} | set(steps[len(steps) - cfg.always_train_last :])
    control, behaviour, noise = controls(ctx, batch, train_steps)
    groups = measurement_groups(batch) if per_measurement(ctx) else None
    log_likelihood = cfg.likelihood_weight * batch["reward"].float()  # the target's: lambda log p(y | x_0)
    loss, info = log_variance_loss(control, behaviour, noise, log_likelihood, cfg.loss_threshold, groups)
    kept_fraction = info["kept"].float().mean().item()
    ctx.optimizer.zero_grad(set_to_none=True)
    stepped = all_replicas(ctx, kept_fraction >= cfg.min_kept_fraction)
    step_metrics = {"train/grad_norm": 0.0, "train/skipped_steps": 0.0}
    if stepped:
        loss.backward()
        step_metrics = optimizer_step(ctx, cfg)
    # importance weights of the stored paths under the current policy against the one that sampled them:
    # log w = sum_k log N(z_k - (u_k - u^b_k)) - log N(z_k); their effective sample size measures staleness
    shift = (control.detach() - behaviour)
    log_w = (-0.5 * (noise - shift).pow(2) + 0.5 * noise.pow(2)).sum(dim=(1, 2))
    weights = torch.softmax(log_w, 0)
    return {
        "loss/log_variance": loss.item(),
        "deft/objective_mean": info["objective"].mean().item(),  # estimates -log Z when the loss is small
        "deft/control_energy": 0.5 * control.detach().pow(2).sum(dim=(1, 2)).mean().item(),
        "deft/kept_fraction": kept_fraction,
        "deft/buffer_ess_fraction": (1.0 / weights.pow(2).sum()).item() / len(weights),
        "deft/skipped_steps": float(not stepped),
        **step_metrics,
    }


def all_replicas(ctx: LearnerContext, decision: bool) -> bool:
    """True when the decision holds on every learner replica (they must all step, or none: gradients are
    all-reduced)."""
    if ctx.world_size == 1:
        return decision
    import torch.distributed as dist

    flag = torch.tensor([float(decision)], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@torch.no_grad()
def sample_base(ctx: LearnerContext, n: int, chunk: int = 256) -> torch.Tensor:
    """[n, C, H, W] samples x_0 of the frozen base model with the env's sampler (the h-net left out)."""
    policy, env = ctx.policy, ctx.env
    samples = []
    for start in range(0, n, chunk):
        x = torch.randn((min(chunk, n - start), *env.sample_shape), generator=ctx.generator).to(ctx.device)
        context = torch.zeros(len(x), 0, device=ctx.device)  # unconditional: the base model ignores y
        for k in range(policy.schedule.num_steps):
            noise = torch.randn(x.shape, generator=ctx.generator).to(ctx.device)
            x = policy.step(x, k, context, noise=noise, reference=True).prev_sample
        samples.append(x)
    return torch.cat(samples)


def training_pairs(ctx: LearnerContext, cfg: Config, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 [n, C, H, W] and y [n, *m]: rows of the env's training cases, or base-model samples measured anew."""
    n = cfg.supervised_batch_size
    if cfg.pairs == "data":
        cases = ctx.env.cases
        rows = torch.randint(len(cases), (n,), generator=ctx.generator)
        return cases.images[rows].to(ctx.device), cases.measurements[rows].to(ctx.device)
    if "base_samples" not in state:  # drawn once per learner (again after a resume: any base samples will do)
        state["base_samples"] = sample_base(ctx, cfg.base_samples)
    pool = state["base_samples"]
    x0 = pool[torch.randint(len(pool), (n,), generator=ctx.generator).to(pool.device)]
    clean = ctx.env.operator(x0)  # [n, *m]
    return x0, clean + ctx.env.sigma_y * torch.randn(clean.shape, generator=ctx.generator).to(ctx.device)


def supervised_step(ctx: LearnerContext, cfg: Config, state: dict) -> dict[str, float]:
    policy, schedule = ctx.policy, ctx.policy.schedule
    n = cfg.supervised_batch_size
    x0, y = training_pairs(ctx, cfg, state)
    steps = schedule.stochastic_steps.cpu()
    k = steps[torch.randint(len(steps), (n,), generator=ctx.generator)].to(ctx.device)
    timestep = schedule.timesteps[k]
    a_t = schedule.alpha_prod[k].view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=ctx.generator).to(ctx.device)
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
    with torch.no_grad():
        base_eps = policy.base_forward(x_t, timestep, y).float()
    loss = supervised_loss(policy(x_t, timestep, y, base_output=base_eps), noise)
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return {"loss/score_matching": loss.item(), **optimizer_step(ctx, cfg)}


# ---- the learner-side interface (see rlft.algorithms.Algorithm) ----
def uses_rollouts(cfg: Config) -> bool:
    return cfg.variant == "log_variance"  # the supervised variant trains on the env's pairs, without sampling


def reference_roles(cfg: Config) -> tuple[str, ...]:
    return ()  # the base network under the h-net is frozen anyway


def validate(spec) -> list[str]:
    if spec.env.FLOW:
        return ["algo=deft's h-transform and its path weights are written for the DDIM transitions of a DDPM; "
                f"env={spec.env.name} is a flow-matching model: use algo=grpo, nft, ddpo, draft or adjoint_matching"]
    if spec.env.LATENT:
        return ["algo=deft trains a small h-transform beside a frozen pixel-space DDPM (conditioned on a measurement "
                f"or a reward); env={spec.env.name} is a latent text-to-image model: use algo=ddpo, draft or "
                "adjoint_matching"]
    if spec.ray.learner_parallelism == "fsdp":
        return ["algo=deft trains a small h-transform beside a frozen base network, and ray.learner_parallelism=fsdp "
                "shards a network that is fully fine-tuned: use ray.learner_parallelism=ddp"]  # fmt: skip
    if spec.algo.variant == "supervised" and spec.env.kind != "inverse":
        return [f"algo.variant=supervised trains on (x, y) pairs of an inverse-problem env, and env={spec.env.name} "
                "has none: use env=digits_sr or env=digits_inpaint, or algo.variant=log_variance"]
    return []


def make_state(cfg: Config) -> dict:
    return {}  # pairs="base" keeps its base-model samples here ("base_samples"); nothing else beyond the h-net


def postprocess_rollout(worker, batch: TensorDict, cfg: Config) -> TensorDict:
    return batch


def prepare(batch: TensorDict, cfg: Config, state: dict) -> tuple[TensorDict, dict]:
    return batch, {}


def update(ctx: LearnerContext, cfg: Config, state: dict) -> dict[str, float]:
    """log_variance: `passes` reshuffled passes over the buffer (stale trajectories included); supervised:
    `supervised_steps` optimizer steps on fresh (x, y, t) triples."""
    if cfg.variant == "supervised":
        return mean_over_steps([supervised_step(ctx, cfg, state) for _ in range(cfg.supervised_steps)])

    def minibatches():
        return measurement_minibatches(ctx, cfg.minibatch_size) if per_measurement(ctx) else ctx.minibatches()

    return mean_over_steps([log_variance_step(ctx, mb, cfg) for _ in range(cfg.passes) for mb in minibatches()])
