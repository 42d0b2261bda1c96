"""Few-step deterministic samplers for the learned-sigma STDiT: DDIM and DPM-Solver++ (2nd-order multistep).

Both run a diffusers scheduler on the training schedule of Bora's IDDPM (linear betas 1e-4 … 0.02 over 1000
steps, epsilon prediction) with "trailing" timesteps, so the first model call sees t=999 like IDDPM's. The
model predicts (eps, v); only eps = the first C channels goes to the scheduler and `variance_type` stays None
(diffusers' DiT pipeline does the same; its learned_range path assumes 3-channel pixel models). Guidance is
upstream's rule from `iddpm.guided_output` (cfg_channel included). Neither algorithm draws noise after the
initial latent, so `generators` only matter for z.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from model.errors import InvalidInput
from model.schedulers.iddpm import (
    BETA_END,
    BETA_START,
    NUM_TRAIN_TIMESTEPS,
    Generators,
    StepCallback,
    check_cancel,
    finish_step,
    guided_output,
    linear_betas,
    prepare_caption,
    validate_guidance,
    validate_steps,
)

_TRAINING_SCHEDULE = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END, beta_schedule="linear",
    prediction_type="epsilon", timestep_spacing="trailing",
)
ALGORITHMS = ("ddim", "dpm-solver++")


class FastSampler:
    """`algorithm` in ALGORITHMS; the uniform `sample(model, z, y_cond, ...)` interface (see __init__)."""

    def __init__(self, algorithm: str, num_inference_steps: int, cfg_scale: float = 7.0,
                 cfg_channel: int | None = 3):
        if algorithm not in ALGORITHMS:
            raise InvalidInput(f"unknown fast sampler {algorithm!r}; expected one of {ALGORITHMS}")
        validate_steps(num_inference_steps)
        validate_guidance(cfg_scale, cfg_channel)
        self.name = algorithm
        self.num_inference_steps = num_inference_steps
        self.cfg_scale = float(cfg_scale)
        self.cfg_channel = cfg_channel

    def make_scheduler(self) -> DDIMScheduler | DPMSolverMultistepScheduler:
        """A fresh scheduler: diffusers schedulers keep per-run state (step index, solver history)."""
        if self.name == "ddim":
            return DDIMScheduler(**_TRAINING_SCHEDULE, clip_sample=False, set_alpha_to_one=True)
        return DPMSolverMultistepScheduler(
            **_TRAINING_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
            variance_type=None,
        )

    def sample(
        self,
        model: Callable[..., torch.Tensor],
        z: torch.Tensor,
        y_cond: torch.Tensor,
        y_null: torch.Tensor,
        mask: torch.Tensor | None,
        generators: Generators = None,
        callback: StepCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Run the reverse process from noise z [n,C,T,H,W] and return x0 [n,C,T,H,W] float32."""
        del generators  # deterministic after z: DDIM with eta=0 and DPM-Solver++ draw no noise
        n, c = z.shape[:2]
        device = z.device
        scheduler = self.make_scheduler()
        scheduler.set_timesteps(self.num_inference_steps, device=device)
        y = torch.cat([y_cond, y_null], dim=0).to(device)  # [2n,1,L,Cy]
        if mask is not None:
            mask = mask.to(device)
        y, mask = prepare_caption(model, y, mask)
        x = z.float() * scheduler.init_noise_sigma
        total = len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps.tolist()):
            check_cancel(should_cancel, i, total)
            timestep = int(t)
            t_batch = torch.full((2 * n,), timestep, dtype=torch.int64, device=device)
            with torch.no_grad():
                eps = guided_output(model, x, t_batch, y, mask, self.cfg_scale, self.cfg_channel)
            eps = eps[:, :c]  # eps only: drop the learned-variance channels
            if self.name == "ddim":
                following = int(scheduler.timesteps[i + 1]) if i + 1 < total else None
                x = ddim_step(eps, timestep, following, x)
            else:
                x = scheduler.step(eps, timestep, x).prev_sample
            finish_step(x, i, total, timestep, callback)
        return x


_ALPHAS_CUMPROD = np.cumprod(1.0 - linear_betas(NUM_TRAIN_TIMESTEPS))  # float64


def ddim_step(eps: torch.Tensor, timestep: int, following: int | None, x: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta=0; Song et al. 2021, eq. 12) from `timestep` to the schedule's next one
    (ᾱ = 1, the data, after the last). diffusers' `DDIMScheduler.step` instead goes to
    `timestep - 1000 // N`, which is not the next trailing timestep when N does not divide 1000, so its
    trajectory drifts off the ODE as N grows (tests/model/test_sampler_oracle.py caught it)."""
    alpha = float(_ALPHAS_CUMPROD[timestep])
    alpha_next = 1.0 if following is None else float(_ALPHAS_CUMPROD[following])
    x0 = (x - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha)
    return math.sqrt(alpha_next) * x0 + math.sqrt(1 - alpha_next) * eps
