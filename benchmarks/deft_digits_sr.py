"""DEFT on 4x super-resolution of HELD-OUT digits: PSNR and measurement error against the base model and DPS.

    python benchmarks/deft_digits_sr.py                     # CPU defaults (~40 minutes on a quiet 2-core box)
    python benchmarks/deft_digits_sr.py --epochs 80 --supervised-steps 6000 --threads 2   # longer training
    python benchmarks/deft_digits_sr.py --steps 20 --supervised-steps 6000   # the env's 20 sampling steps (~90 minutes)

Every method samples with the same DDIM schedule (env.num_inference_steps, eta = 1) from the same initial
noise on the same held-out cases (digits never seen by the base model or the h-net):
- base: the unconditional base model (ignores y);
- DPS: the base model plus a gradient step per sampling step on ||y - A(x0_hat(x_t))|| through the network
  (Chung et al. 2023, step zeta / ||y - A(x0_hat)||), zeta chosen on 192 samples of TRAIN cases from a grid;
- DEFT log-variance and DEFT supervised: the base model plus the trained h-net (algorithms/deft.py), trained on
  measurements of the train split through the same learner / rollout-worker loop as `python -m rlft.run`; and
  DEFT supervised on base-model pairs (`algo.pairs=base`): the same regression on the base model's own samples,
  measured anew, which needs no ground truth and targets log-variance's lambda = 1 posterior.
  Log-variance's one knob, the likelihood weight lambda (target p(x_0) p(y | x_0)^lambda), is chosen like DPS's
  step: one h-net per value of a grid, the best PSNR on 192 samples of TRAIN cases wins.
Per method: PSNR of each sample to its ground truth (the mean over samples), PSNR of each case's sample mean, the
samples' spread (a posterior sampler's samples scatter, which costs per-sample PSNR), and the measurement error;
for DEFT also the path objective E[L] on its own samples (`path_objective`: a KL to the posterior, up to a constant).
The cases differ from each other far more than the methods do, so each DEFT variant is also compared with DPS and
with the other variant case by case: the mean of the per-case PSNR differences, its standard error and the cases won.
Prints a table and writes benchmarks/results/deft_digits_sr.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tensordict import TensorDict

from rlft.algorithms import deft
from rlft.config import compose, validate
from rlft.envs.inverse import psnr
from rlft.learner import train
from rlft.rollout import RolloutGroup, RolloutWorker, derive_seed, local_call

RESULTS = Path(__file__).parent / "results"
SUPERVISED_STEPS_PER_EPOCH = 20  # DEFT supervised: optimizer steps per epoch of the learner loop


def run_config(algo: str, args, *extra: str):
    spec = compose([
        f"algo={algo}", "env=digits_sr", f"env.num_inference_steps={args.steps}", f"device={args.device}",
        f"trainer.rollout_batch_size={args.batch}", f"trainer.samples_per_epoch={args.batch * 2}",
        f"eval.num_samples={args.eval_samples}", "ray.enabled=false", "logging.wandb=disabled",
        "logging.progress=false", f"ray.rollout_threads={args.threads or 'null'}",
        f"ray.learner_threads={args.threads or 'null'}", f"algo.minibatch_size={args.batch}",
        *extra,
    ])  # fmt: skip
    validate(spec)
    return spec


def describe(env, images: torch.Tensor, context: torch.Tensor) -> dict:
    """The env's evaluation metrics, plus `case_psnr`: each case's mean PSNR over its samples (consecutive samples
    with one measurement form a case), for the paired comparison of methods on the same cases."""
    described = env.describe(images, context)
    described.pop("panel", None)
    case = torch.unique_consecutive(context.flatten(1), dim=0, return_inverse=True)[1]  # [B]
    per_sample = psnr(images, env.cases.ground_truth(context))  # [B]
    totals = torch.zeros(int(case.max()) + 1).index_add_(0, case, per_sample)
    return {**described, "case_psnr": (totals / torch.bincount(case)).tolist()}


def held_out(worker: RolloutWorker, args) -> tuple[dict, TensorDict]:
    """The worker's policy on the held-out cases (the same noise for every method): metrics and the paths."""
    batch = worker.collect(worker.policy_version, args.eval_seed, args.eval_samples, postprocess=False,
                           env=worker.eval_env)  # fmt: skip
    return describe(worker.eval_env, batch["latents"][:, -1], batch["context"]), batch


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Method a minus method b on the same cases (per-case PSNR): the mean difference, its standard error, and on how
    many cases a is better; the cases differ far more from each other than the methods do, so only pairing shows it."""
    difference = torch.tensor(a) - torch.tensor(b)
    return {"mean_db": difference.mean().item(), "standard_error_db": (difference.std() / len(a) ** 0.5).item(),
            "better_cases": int((difference > 0).sum()), "cases": len(a)}  # fmt: skip


def dps_sample(worker: RolloutWorker, env, seed: int, zeta: float,
               batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """DPS on the base model: after each DDIM step, x_{t-1} -= zeta * grad_{x_t} ||y - A(x0_hat(x_t))|| . The initial
    noise, the cases and the step noise of `seed` are those of a rollout worker's batch of that seed."""
    policy, schedule = worker.policy, env.schedule
    obs, _ = env.reset(seed=seed, options={"batch_index": batch_index})
    generator = torch.Generator().manual_seed(derive_seed(seed, 1))  # the step-noise stream of RolloutWorker._rollout
    x, y = obs["x_t"], obs["context"]
    for k in range(schedule.num_steps):
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        x = x.detach().requires_grad_(True)
        timestep = schedule.timesteps[k].expand(x.shape[0])
        eps = policy.base_forward(x, timestep, y)
        a_t = schedule.alpha_prod[k]
        x0_hat = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        distance = (env.operator(x0_hat) - y).flatten(1).norm(dim=1)  # [B]
        (gradient,) = torch.autograd.grad(distance.sum(), x)
        with torch.no_grad():
            step = policy.step(x, k, y, noise=noise, base_output=eps)
            x = step.prev_sample - zeta * gradient if k < schedule.num_steps - 1 else step.prev_sample
    return x.detach(), y


def dps_metrics(worker, env, seed: int, zeta: float, n: int) -> dict[str, float]:
    images, contexts = [], []
    for chunk in range(n // env.num_envs):
        x, y = dps_sample(worker, env, derive_seed(seed, chunk), zeta, chunk)  # the chunks' seeds of a collect
        images.append(x)
        contexts.append(y)
    return describe(env, torch.cat(images), torch.cat(contexts))


def train_case_psnr(worker: RolloutWorker, env, seed: int, n: int) -> float:
    """PSNR of the worker's policy on `n` samples of training cases (`env`: the training split)."""
    batch = worker.collect(worker.policy_version, seed, n, postprocess=False, env=env)
    return describe(env, batch["latents"][:, -1], batch["context"])["psnr"]


@torch.no_grad()
def path_objective(worker: RolloutWorker, batch: TensorDict, likelihood_weight: float = 1.0) -> dict[str, float]:
    """E[L] over the h-net's own samples of the held-out cases, L = sum_k (|u_k|^2 / 2 + <u_k, z_k>) - log p(y | x_0)
    (log_variance_loss's L on on-policy paths). Its mean is KL(P_h || P_posterior) - log Z(y), the same log Z(y) for
    every h-net on these cases, so a lower E[L] means a path measure closer to the posterior under the base model.
    With a likelihood weight lambda, the target and so E[L] are those of p(x_0) p(y | x_0)^lambda."""
    _, control, noise = deft.controls(SimpleNamespace(policy=worker.policy), batch, set())  # on-policy: u = u^b
    _, info = deft.log_variance_loss(control, control, noise, likelihood_weight * batch["reward"].float())
    energy = 0.5 * control.pow(2).sum(dim=(1, 2))  # [B]
    return {"path_objective": info["objective"].mean().item(), "control_energy": energy.mean().item()}


def train_deft(cfg, device: torch.device) -> tuple[RolloutWorker, float, list[dict]]:
    """The `python -m rlft.run ray.enabled=false` loop; returns an evaluation worker holding the final h-net."""
    worker = RolloutWorker(cfg)
    history: list[dict] = []
    final: dict = {}

    def report(kind: str, payload: dict) -> None:
        if kind == "metrics":
            history.append({k: v for k, v in payload.items() if isinstance(v, int | float)})
        elif kind == "weights":
            final.update(payload)

    start = time.perf_counter()
    train(cfg, RolloutGroup([worker], local_call), report, device)
    seconds = time.perf_counter() - start
    worker.set_weights(final["weights"], final["policy_version"])
    return worker, seconds, history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = all cores)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM sampling steps for every method")
    parser.add_argument("--batch", type=int, default=32, help="rollout batch (trajectories per env batch)")
    parser.add_argument("--epochs", type=int, default=40, help="DEFT log-variance epochs (2 batches each)")
    parser.add_argument("--supervised-steps", type=int, default=3000,
                        help="DEFT supervised optimizer steps (cosine learning-rate decay over them)")
    parser.add_argument("--base-samples", type=int, default=2048,
                        help="DEFT supervised on base-model pairs: samples the base model draws for them")
    parser.add_argument("--eval-samples", type=int, default=384, help="held-out samples (6 per case)")
    parser.add_argument("--dps-tune-samples", type=int, default=192, help="train-case samples per DPS step size")
    parser.add_argument("--eval-seed", type=int, default=1234)
    parser.add_argument("--likelihood-weights", default="1,2,4,8",
                        help="log-variance's likelihood weights lambda tried on train cases")
    parser.add_argument("--zetas", default="1,2,5,10,15,20,30,50,100", help="DPS step sizes tried on train cases")
    parser.add_argument("--out", default=str(RESULTS / "deft_digits_sr.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows: dict[str, dict] = {}

    base_cfg = run_config("ddpo", args, "env.samples_per_case=1")  # DPS is tuned on 64 distinct train cases
    base = RolloutWorker(base_cfg)
    base_params = sum(p.numel() for p in base.policy.unet.parameters())
    rows["base (unconditional)"] = {**held_out(base, args)[0], "train_s": 0.0, "trainable_params": 0}

    train_env = base.env  # DPS's step size is chosen on TRAIN measurements, then used on the held-out cases
    tuning = {z: dps_metrics(base, train_env, 99, z, args.dps_tune_samples)["psnr"]
              for z in map(float, args.zetas.split(","))}  # fmt: skip
    zeta = max(tuning, key=tuning.get)
    rows[f"DPS (zeta={zeta:g})"] = {**dps_metrics(base, base.eval_env, args.eval_seed, zeta, args.eval_samples),
                                    "train_s": 0.0, "trainable_params": 0}  # fmt: skip

    lv_overrides = [f"trainer.epochs={args.epochs}", "trainer.max_staleness=1", "trainer.lr_schedule=cosine",
                    f"trainer.buffer_capacity={args.batch * 4}", f"eval.every={args.epochs}"]  # fmt: skip
    lv_tuning, best_lv = {}, None
    for weight in map(float, args.likelihood_weights.split(",")):
        cfg = run_config("deft", args, *lv_overrides, f"algo.likelihood_weight={weight}")
        worker, seconds, history = train_deft(cfg, device)
        metrics, paths = held_out(worker, args)
        lv_tuning[weight] = {"train_psnr": train_case_psnr(worker, train_env, 99, args.dps_tune_samples),
                             "heldout_psnr": metrics["psnr"], "train_s": seconds}  # fmt: skip
        print(f"  log-variance, lambda {weight:g}: PSNR on train cases {lv_tuning[weight]['train_psnr']:.2f} dB "
              f"(held-out {metrics['psnr']:.2f})", flush=True)
        if max(lv_tuning, key=lambda w: lv_tuning[w]["train_psnr"]) == weight:  # keep only the best h-net so far
            best_lv = (f"DEFT log-variance (lambda={weight:g})", worker, seconds, history, weight, (metrics, paths))
    # epochs of a few optimizer steps each, so the cosine schedule decays the learning rate over the whole run
    per_epoch = min(SUPERVISED_STEPS_PER_EPOCH, args.supervised_steps)
    epochs = -(-args.supervised_steps // per_epoch)
    supervised_cfg = run_config("deft", args, "algo.variant=supervised", f"trainer.epochs={epochs}",
                                f"algo.supervised_steps={per_epoch}", "trainer.lr_schedule=cosine",
                                f"eval.every={epochs}")  # fmt: skip
    deft_runs = [best_lv]
    for name, pairs in (("DEFT supervised", "data"), ("DEFT supervised on base-model pairs", "base")):
        algo = dataclasses.replace(supervised_cfg.algo, pairs=pairs, base_samples=args.base_samples)
        worker, seconds, history = train_deft(dataclasses.replace(supervised_cfg, algo=algo), device)
        deft_runs.append((name, worker, seconds, history, 1.0, held_out(worker, args)))
    histories = {}
    for name, worker, seconds, history, weight, (metrics, paths) in deft_runs:
        histories[name] = history
        h_params = sum(p.numel() for p in worker.policy.correction.parameters())
        rows[name] = {**metrics, **path_objective(worker, paths, weight), "train_s": seconds,
                      "trainable_params": h_params}  # fmt: skip

    print(f"\n4x super-resolution of held-out digits, sigma_y = {base_cfg.env.sigma_y}, {args.steps} DDIM steps "
          f"(eta = 1), {args.eval_samples} samples over {-(-args.eval_samples // 6)} cases; base model {base_params:,} "
          f"parameters; device {args.device}")  # fmt: skip
    print("| method | PSNR (dB) | PSNR of case mean (dB) | sample spread | measurement error RMS | train s | "
          "trainable params |\n|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['psnr']:.2f} | {row['psnr_of_case_mean']:.2f} | {row['sample_spread']:.3f} | "
              f"{row['measurement_error']:.3f} | {row['train_s']:.0f} | "
              f"{row['trainable_params']:,} ({row['trainable_params'] / base_params:.1%} of base) |")
    print(f"ground truth's own measurement error: {rows['base (unconditional)']['ground_truth_measurement_error']:.3f}")
    print("DEFT's path objective E[L] on its own held-out samples (KL to the posterior under the base model, up to the "
          "same log Z(y)):")
    for name in histories:
        print(f"  {name}: E[L] {rows[name]['path_objective']:.1f} (control energy {rows[name]['control_energy']:.1f})")
    dps = next(name for name in rows if name.startswith("DPS"))
    pairs = [(name, dps) for name in histories] + list(itertools.combinations(histories, 2))
    comparisons = {f"{a} - {b}": paired(rows[a]["case_psnr"], rows[b]["case_psnr"]) for a, b in pairs}
    print("PSNR paired by held-out case (the mean over each case's samples), difference +- standard error:")
    for pair, c in comparisons.items():
        print(f"  {pair}: {c['mean_db']:+.2f} +- {c['standard_error_db']:.2f} dB (t = "
              f"{c['mean_db'] / c['standard_error_db']:.1f}), better on {c['better_cases']} of {c['cases']} cases")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "task": "digits 4x super-resolution, held-out split", "sigma_y": base_cfg.env.sigma_y,
        "sampling_steps": args.steps, "eval_samples": args.eval_samples, "device": args.device,
        "base_params": base_params, "dps_zeta_tuning_psnr_on_train": tuning, "lv_likelihood_weight_tuning": lv_tuning,
        "methods": rows, "paired_psnr": comparisons,
        "args": vars(args), "training_history": histories,
    }, indent=2))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
