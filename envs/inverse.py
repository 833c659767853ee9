"""Inverse problems as denoising MDPs: recover x from y = A(x) + sigma_y * noise (DEFT, Denker et al. 2024, sec. 5).

The measurement y is the env's context: each episode draws a case (x, y) from a fixed set of measurement cases,
the policy sees only y, and the reward is the measurement log-likelihood

    r(x_0, y) = log p(y | x_0) + const = -|A(x_0) - y|^2 / (2 sigma_y^2)          (summed over measured values)

so any reward algorithm (DDPO, DRaFT, AM) can also use these envs. The h-net of DEFT trains on the measurements of
the TRAIN split; evaluations use the HELD-OUT split, never seen by the base model or the h-net. Evaluation
reports the PSNR to the ground truth and the measurement error, and an image panel with the measurement, the
samples and the ground truth side by side for each fixed evaluation case.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from rlft.core.spec import knob
from rlft.envs.denoising import DenoisingEnv
from rlft.envs.rewards import Accepts, Reward, RewardConfig, register_reward

SAMPLES_PER_CASE = 6  # evaluation panel rows: measurement, 6 samples, ground truth (8 columns)


class SuperResolution:
    """A(x) = average pooling by `scale` (each low-resolution pixel is the mean of a scale x scale block)."""

    def __init__(self, scale: int = 4):
        if scale < 1:
            raise ValueError(f"super-resolution scale must be a positive integer, got {scale}")
        self.scale = scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.scale or x.shape[-2] % self.scale:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the SR scale {self.scale}")
        return F.avg_pool2d(x, self.scale)  # [B, C, H/s, W/s]

    def measurement_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        c, h, w = sample_shape
        return (c, h // self.scale, w // self.scale)

    def show(self, y: torch.Tensor) -> torch.Tensor:
        """The measurement at the image's resolution, for panels (nearest-neighbour blocks)."""
        return F.interpolate(y, scale_factor=self.scale, mode="nearest")


class Inpainting:
    """A(x) = M * x with a binary mask M that hides the central square (side `hole_fraction` of the image)."""

    def __init__(self, hole_fraction: float = 0.5):
        if not 0 < hole_fraction < 1:
            raise ValueError(f"inpainting hole_fraction must lie in (0, 1), got {hole_fraction}")
        self.hole_fraction = hole_fraction

    def mask(self, like: torch.Tensor) -> torch.Tensor:
        h, w = like.shape[-2:]
        hole_h, hole_w = round(h * self.hole_fraction), round(w * self.hole_fraction)
        mask = torch.ones((1, 1, h, w), dtype=like.dtype, device=like.device)
        top, left = (h - hole_h) // 2, (w - hole_w) // 2
        mask[..., top : top + hole_h, left : left + hole_w] = 0
        return mask  # [1, 1, H, W]: 1 = observed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask(x)  # [B, C, H, W], zero inside the hole

    def measurement_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sample_shape)

    def show(self, y: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask(y) > 0, y, torch.full_like(y, -1.0))  # the hole drawn black


def make_operator(operator: str, scale: int = 4, hole_fraction: float = 0.5) -> SuperResolution | Inpainting:
    if operator == "sr":
        return SuperResolution(scale)
    if operator == "inpaint":
        return Inpainting(hole_fraction)
    raise ValueError(f"unknown forward operator {operator!r}; use 'sr' (average pooling) or 'inpaint' (mask)")


def measurement_log_likelihood(operator, sigma_y: float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log N(y; A(x), sigma_y^2 I) up to its constant, per sample: [B]."""
    residual = operator(x.float()) - y.float()
    return -residual.pow(2).flatten(1).sum(1) / (2 * sigma_y**2)


@register_reward
@dataclass
class MeasurementReward(RewardConfig):
    """The measurement log-likelihood -|A(x_0) - y|^2 / (2 sigma_y^2) of an inverse-problem env; differentiable. A and
    sigma_y come from the env with y (the reward keywords measurement=, operator=, sigma_y=)."""

    name: str = knob("measurement", "reward registry key (reward=<name>)")

    def accepts(self) -> Accepts:
        return Accepts(needs=("measurement",), differentiable=True)

    def build(self, device: str | torch.device = "cpu") -> Reward:
        def log_likelihood(images: torch.Tensor, measurement: torch.Tensor, operator, sigma_y: float,
                           **_) -> torch.Tensor:  # fmt: skip
            return measurement_log_likelihood(operator, sigma_y, images, measurement)

        return Reward(self.name, log_likelihood, True)


@dataclass
class MeasurementCases:
    """Fixed inverse-problem cases of one split: ground truths x [N, C, H, W] and measurements y [N, *m]."""

    images: torch.Tensor
    measurements: torch.Tensor

    @classmethod
    def make(cls, images: torch.Tensor, operator, sigma_y: float, noise_seed: int) -> MeasurementCases:
        """y = A(x) + sigma_y * noise, the noise drawn once from `noise_seed` so a split's cases never change."""
        clean = operator(images)
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(noise_seed))
        return cls(images, clean + sigma_y * noise)

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, n: int, generator: torch.Generator, repeats: int = 1) -> torch.Tensor:
        """Measurements of cases drawn uniformly (the training context sampler), each `repeats` times in a row: a
        posterior sampler can then compare several samples of one measurement (DEFT's per-measurement VarGrad)."""
        rows = torch.randint(len(self), (-(-n // repeats),), generator=generator)
        return self.measurements[rows.repeat_interleave(repeats)[:n]]

    def fixed(self, n: int, generator: torch.Generator, offset: int = 0) -> torch.Tensor:
        """Samples offset .. offset + n of the cases in order, each case SAMPLES_PER_CASE times in a row (evaluation;
        `generator` unused)."""
        indices = torch.arange(offset, offset + n) // SAMPLES_PER_CASE
        if int(indices.max()) >= len(self):
            raise ValueError(f"{n} evaluation samples need {int(indices.max()) + 1} cases; this split has {len(self)}")
        return self.measurements[indices]

    def ground_truth(self, y: torch.Tensor) -> torch.Tensor:
        """The ground truth of each measurement in `y` (found by exact match), [B, C, H, W]."""
        distances = torch.cdist(y.flatten(1).float().cpu(), self.measurements.flatten(1),
                                compute_mode="donot_use_mm_for_euclid_dist")  # [B, N], exact for equal rows
        best, index = distances.min(dim=1)
        if bool((best > 1e-5).any()):
            raise ValueError("a measurement does not belong to this split's cases; ground truth is unknown")
        return self.images[index]


def psnr(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (peak-to-peak range 2), per sample: [B]."""
    mse = (x.float().clamp(-1, 1) - reference.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-12))


class InverseProblemEnv(DenoisingEnv):
    """A denoising env whose context is the measurement y of a case drawn from `cases`."""

    def __init__(self, *args, operator, sigma_y: float, cases: MeasurementCases, evaluation: bool = False,
                 samples_per_case: int = 1, **kwargs):  # fmt: skip
        if samples_per_case < 1:
            raise ValueError(f"env.samples_per_case must be a positive integer, got {samples_per_case}")
        self.cases = cases
        self.batch_index = 0  # evaluation: which batch of the fixed cases the next reset gives (reset's options)
        sampler = self._evaluation_contexts if evaluation else partial(cases.sample, repeats=samples_per_case)
        super().__init__(*args, context_sampler=sampler, context_shape=tuple(cases.measurements.shape[1:]),
                         reward_context=self.measurement_context, **kwargs)  # fmt: skip
        self.operator, self.sigma_y, self.samples_per_case = operator, sigma_y, samples_per_case

    def measurement_context(self, context: torch.Tensor) -> dict:
        """The reward's keywords: the measurement y, the forward operator A and the noise level sigma_y."""
        return {"measurement": context, "operator": self.operator, "sigma_y": self.sigma_y}

    def _evaluation_contexts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.cases.fixed(n, generator, offset=self.batch_index * n)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """`options={"batch_index": i}` gives an evaluation env's i-th batch of its fixed cases, so an evaluation over
        several batches covers consecutive cases instead of repeating the first ones (training envs ignore it)."""
        self.batch_index = (options or {}).get("batch_index", 0)
        return super().reset(seed=seed, options=options)

    @torch.no_grad()
    def describe(self, images: torch.Tensor, context: torch.Tensor) -> dict:
        """Metrics (PSNR to the ground truth, measurement error) and the side-by-side `panel`, one row per case."""
        truth = self.cases.ground_truth(context).to(images.device)
        residual = self.operator(images.float()) - context.float()
        metrics = {
            "psnr": psnr(images, truth).mean().item(),
            # root-mean-square of A(x) - y per measured value: about sigma_y for a measurement-consistent sample
            "measurement_error": residual.pow(2).flatten(1).mean(1).sqrt().mean().item(),
            "ground_truth_measurement_error": (self.operator(truth) - context.float()).pow(2).flatten(1).mean(1)
            .sqrt().mean().item(),
        }  # fmt: skip
        # consecutive samples with the same measurement form one case (evaluation batches come this way)
        starts = [0] + [i for i in range(1, len(context)) if not torch.equal(context[i], context[i - 1])]
        rows, mean_psnrs, spreads = [], [], []
        for start, end in zip(starts, starts[1:] + [len(context)], strict=True):
            samples = images[start : min(end, start + SAMPLES_PER_CASE)].float()
            blank = torch.full((SAMPLES_PER_CASE - len(samples), *samples.shape[1:]), -1.0, device=samples.device)
            shown = self.operator.show(context[start : start + 1].float())
            rows.append(torch.cat([shown, samples, blank, truth[start : start + 1]]))
            if len(samples) > 1:
                # a posterior sampler's samples scatter around the posterior mean: per-sample PSNR is lower than the
                # mean's (exact posterior samples lose 3 dB against it), so both are reported, with the scatter
                clamped = samples.clamp(-1, 1)
                mean_psnrs.append(psnr(clamped.mean(0, keepdim=True), truth[start : start + 1]))
                spreads.append(clamped.std(0).pow(2).mean().sqrt())
        if mean_psnrs:
            metrics["psnr_of_case_mean"] = torch.cat(mean_psnrs).mean().item()  # PSNR of each case's sample mean
            metrics["sample_spread"] = torch.stack(spreads).mean().item()  # RMS of the per-pixel sample std (n - 1)
        panel = torch.cat(rows)  # [cases * (SAMPLES_PER_CASE + 2), C, H, W]: measurement, samples, ground truth
        return {**self.reward.describe(images, **self.reward_context(context)), **metrics, "panel": panel}

