"""IDDPM ancestral sampler, as Open-Sora 1.0 / Bora run it (`opensora/schedulers/iddpm`).

Improved DDPM (Nichol & Dhariwal 2021): linear betas over 1000 training steps, respaced to
`num_sampling_steps` with `space_timesteps`, epsilon prediction, learned-range variance, the posterior
mean taken from the predicted x0 without clipping. The quirks that matter for bit-level parity are listed
in ../shared/reference/README.md (items 8-10): float64 tables cast to float32 before use, guidance on the
first `cfg_channel` output channels only, one `randn` over the full 2n batch per step (even at t=0).

This module also holds the pieces every sampler in `model.schedulers` shares: the guided model call
(`guided_output`), the noise draws (`randn`), and the per-step checks (`check_cancel`, `finish_step`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from model.errors import Interrupted, InvalidInput, NumericalError

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02

Generators = torch.Generator | Sequence[torch.Generator] | None
StepCallback = Callable[[int, int, int], None]


def linear_betas(num_diffusion_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Upstream `get_named_beta_schedule("linear", T)`: linspace(1e-4·1000/T, 0.02·1000/T), float64."""
    scale = 1000 / num_diffusion_timesteps
    return np.linspace(scale * BETA_START, scale * BETA_END, num_diffusion_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Upstream `space_timesteps`: split [0, T) into equal sections, take evenly strided steps in each.

    "10" over 1000 steps gives round(k·111) = 0, 111, ..., 999. ("ddimN" is not supported: Bora never uses it.)
    """
    if isinstance(section_counts, str):
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise InvalidInput(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def validate_guidance(cfg_scale: float, cfg_channel: int | None) -> None:
    if not math.isfinite(cfg_scale):
        raise InvalidInput(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    if cfg_channel is not None and (isinstance(cfg_channel, bool) or not isinstance(cfg_channel, int)
                                    or cfg_channel < 1):
        raise InvalidInput(f"cfg_channel must be None or a positive int, got {cfg_channel!r}")


def validate_steps(num_steps: int, maximum: int = NUM_TRAIN_TIMESTEPS) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= maximum:
        raise InvalidInput(f"num_inference_steps must be an int in 1..{maximum}, got {num_steps!r}")


def prepare_caption(
    model: Callable[..., torch.Tensor], y: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, mask) to pass to every step. The caption is constant over a run, so a model with
    `prepare_condition` (STDiT) has its caption work (embedding, cross-attention keys/values) done here,
    once, and then gets the prepared condition with mask=None. y [2n,1,L,Cy]; mask [n or 2n, L] or None."""
    prepare = getattr(model, "prepare_condition", None)
    if prepare is None:
        return y, mask
    if mask is not None and 2 * mask.shape[0] == y.shape[0]:
        mask = mask.repeat(2, 1)  # [2n,L]: null row j keeps prompt j's positions (README 8)
    with torch.no_grad():
        return prepare(y, mask), None


def guided_output(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor | None,
    cfg_scale: float,
    cfg_channel: int | None,
    model_kwargs: dict | None = None,
) -> torch.Tensor:
    """Classifier-free guidance exactly as upstream `forward_with_cfg`, returning the conditional half.

    x [n,C,T,H,W] is the (first half of the) state; the model sees cat([x, x]) with y = cat([y_cond, y_null]).
    Only output channels [:cfg_channel] are guided, `uncond + s·(cond − uncond)`; channels [cfg_channel:]
    keep the conditional half's own output (with cfg_channel=3 and C=4, eps channel 3 is unguided: README 9).
    cfg_channel=None means C_out // 2, i.e. all eps channels.
    Returns [n, C_out, T, H, W] float32 (upstream copies the guided half into both halves; the second
    half of the state is never fed back to the model, so only the first half is kept).
    """
    n = x.shape[0]
    # a prepared STDiT condition for 2n rows takes the n shared latents itself (see STDiT.forward)
    combined = x if getattr(y, "batch", None) == 2 * n else torch.cat([x, x], dim=0)  # [2n,C,T,H,W]
    if mask is not None and mask.shape[0] == n:
        mask = mask.repeat(2, 1)  # [2n,L]: null row j keeps prompt j's positions (README 8), bitwise as upstream
    out = model(combined, t, y, mask=mask, **(model_kwargs or {}))
    out = (out["x"] if isinstance(out, dict) else out).float()  # [2n,C_out,T,H,W]
    c = out.shape[1] // 2 if cfg_channel is None else cfg_channel
    if c > out.shape[1]:
        raise InvalidInput(f"cfg_channel={cfg_channel} exceeds the model's {out.shape[1]} output channels")
    eps, rest = out[:, :c], out[:, c:]
    cond_eps, uncond_eps = torch.split(eps, n, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)  # upstream's exact expression order
    return torch.cat([half_eps, rest[:n]], dim=1)


def randn(shape: Sequence[int], generators: Generators, device: torch.device | str) -> torch.Tensor:
    """Standard normal float32 noise of `shape` on `device`.

    - None: the device's global RNG (`torch.manual_seed` then upstream code reproduces bit for bit);
    - one Generator: a single draw over the whole shape (upstream RNG order), made on the generator's
      device and moved, so a CPU generator gives the same numbers whatever the target device;
    - a list of n generators: row i comes from generators[i] alone (shape[0] must be n), so a sample
      does not depend on its batch position or on the other prompts.
    """
    shape = tuple(shape)
    if generators is None:
        return torch.randn(shape, device=device)
    if isinstance(generators, torch.Generator):
        return torch.randn(shape, generator=generators, device=generators.device).to(device)
    if len(generators) != shape[0]:
        raise InvalidInput(f"got {len(generators)} generators for a batch of {shape[0]}")
    rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device).to(device) for g in generators]
    return torch.cat(rows, dim=0)


def check_cancel(should_cancel: Callable[[], bool] | None, step_index: int, total: int) -> None:
    if should_cancel is not None and should_cancel():
        raise Interrupted(f"sampling canceled before step {step_index + 1}/{total}")


def finish_step(
    x: torch.Tensor, step_index: int, total: int, timestep: int, callback: StepCallback | None
) -> None:
    """Raise NumericalError if the new latent is non-finite, then report the step."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NumericalError(
            f"latent became non-finite at step {step_index + 1}/{total} (timestep {timestep}): "
            f"{bad} of {x.numel()} values are NaN/inf"
        )
    if callback is not None:
        callback(step_index, total, timestep)


class IDDPM:
    """Upstream `IDDPM(num_sampling_steps, cfg_scale, cfg_channel)` with learn_sigma=True, linear schedule.

    Two entry points share one loop (`denoise`) and one update rule (`p_sample`):
    - `sample(model, text_encoder, z_size, prompts, device, ...)`: upstream's call, same RNG order;
    - `denoise(model, z, y_cond, y_null, mask, generators, ...)`: what `IDDPMSampler.sample` runs.
    """

    name = "iddpm"

    def __init__(self, num_sampling_steps: int = 100, cfg_scale: float = 7.0, cfg_channel: int | None = 3):
        validate_steps(num_sampling_steps)
        validate_guidance(cfg_scale, cfg_channel)
        self.num_sampling_steps = num_sampling_steps
        self.cfg_scale = float(cfg_scale)
        self.cfg_channel = cfg_channel

        # SpacedDiffusion.__init__: keep the chosen steps, recompute betas from the kept alphas_cumprod.
        use_timesteps = space_timesteps(NUM_TRAIN_TIMESTEPS, str(num_sampling_steps))
        base_alphas_cumprod = np.cumprod(1.0 - linear_betas(NUM_TRAIN_TIMESTEPS))
        last_alpha_cumprod = 1.0
        new_betas, self.timestep_map = [], []
        for i, alpha_cumprod in enumerate(base_alphas_cumprod):
            if i in use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)

        # GaussianDiffusion.__init__ on the respaced betas, all float64.
        betas = np.array(new_betas, dtype=np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        # log of the posterior variance, with the 0 at t=0 replaced by the value at t=1
        self.posterior_log_variance_clipped = (
            np.log(np.append(posterior_variance[1], posterior_variance[1:]))
            if len(posterior_variance) > 1 else np.array([])  # one step: never used (t=0 adds no noise)
        )
        self.posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)

        # upstream `_extract_into_tensor`: index the float64 table, then `.float()`.
        def f32(arr: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.asarray(arr, dtype=np.float64)).float()

        self._sqrt_recip_ac = f32(np.sqrt(1.0 / alphas_cumprod))
        self._sqrt_recipm1_ac = f32(np.sqrt(1.0 / alphas_cumprod - 1))
        self._coef1 = f32(self.posterior_mean_coef1)
        self._coef2 = f32(self.posterior_mean_coef2)
        self._max_log = f32(np.log(betas))
        self._min_log = f32(self.posterior_log_variance_clipped if len(betas) > 1 else np.log(betas))

    @property
    def num_timesteps(self) -> int:
        return len(self.timestep_map)

    def p_sample(self, model_output: torch.Tensor, x: torch.Tensor, step: int, noise: torch.Tensor) -> torch.Tensor:
        """One reverse step from respaced index `step`: upstream `p_mean_variance` + `p_sample`.

        model_output [B,2C,...] = (eps, v) after guidance; x, noise [B,C,...] float32. Returns x_{t-1}.
        """
        c = x.shape[1]
        if model_output.shape[1] != 2 * c:
            raise InvalidInput(
                f"IDDPM needs a learned-sigma model (2·{c} output channels), got {model_output.shape[1]}"
            )
        eps, model_var_values = torch.split(model_output, c, dim=1)
        # LEARNED_RANGE: interpolate the log variance between the clipped posterior and beta_t
        min_log, max_log = self._min_log[step], self._max_log[step]
        frac = (model_var_values + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        # EPSILON: x0 = sqrt(1/ᾱ)·x_t − sqrt(1/ᾱ − 1)·eps, no clipping (clip_denoised=False)
        pred_xstart = self._sqrt_recip_ac[step] * x - self._sqrt_recipm1_ac[step] * eps
        mean = self._coef1[step] * pred_xstart + self._coef2[step] * x
        nonzero_mask = float(step != 0)  # no noise at t=0 (upstream still draws it)
        return mean + nonzero_mask * torch.exp(0.5 * model_log_variance) * noise

    def denoise(
        self,
        model: Callable[..., torch.Tensor],
        z: torch.Tensor,
        y_cond: torch.Tensor,
        y_null: torch.Tensor,
        mask: torch.Tensor | None,
        generators: Generators = None,
        callback: StepCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        model_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """Run the reverse process from noise z [n,C,T,H,W] (float32) and return x0 [n,C,T,H,W].

        The model is called as model(x[2n], t[2n] int64, y[2n,1,L,Cy], mask=mask[2n,L]|None) -> [2n,2C,...].
        With None or one generator each step draws noise for the full 2n batch (upstream RNG order) and
        uses the first n rows; with a list of n generators row i's noise comes from generators[i].
        """
        n = z.shape[0]
        device = z.device
        y = torch.cat([y_cond, y_null], dim=0).to(device)  # [2n,1,L,Cy]
        if mask is not None:
            mask = mask.to(device)
        y, mask = prepare_caption(model, y, mask)
        per_row = generators is not None and not isinstance(generators, torch.Generator)
        noise_shape = z.shape if per_row else (2 * n, *z.shape[1:])
        x = z.float()
        total = self.num_timesteps
        for i, step in enumerate(reversed(range(total))):
            check_cancel(should_cancel, i, total)
            timestep = self.timestep_map[step]
            t = torch.full((2 * n,), timestep, dtype=torch.int64, device=device)
            with torch.no_grad():
                out = guided_output(model, x, t, y, mask, self.cfg_scale, self.cfg_channel, model_kwargs)
            noise = randn(noise_shape, generators, device)[:n]
            x = self.p_sample(out, x, step, noise)
            finish_step(x, i, total, timestep, callback)
        return x

    def sample(
        self,
        model: Callable[..., torch.Tensor],
        text_encoder,
        z_size: Sequence[int],
        prompts: Sequence[str],
        device: torch.device | str,
        additional_args: dict | None = None,
        generator: Generators = None,
        callback: StepCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Upstream `IDDPM.sample`: z0 = randn(n, *z_size), encode prompts, guided ancestral loop.

        text_encoder has `encode(prompts) -> {"y": [n,1,L,Cy], "mask": [n,L]}` and `null(n) -> [n,1,L,Cy]`.
        generator=None uses the global RNG, so `torch.manual_seed(s)` before this call reproduces upstream.
        additional_args are passed to the model as keyword arguments ("mask" replaces the encoder's mask).
        Returns [n,C,T,H,W] float32.
        """
        n = len(prompts)
        z = randn((n, *z_size), generator, device)
        model_args = dict(text_encoder.encode(list(prompts)))
        y_null = text_encoder.null(n)
        model_args.update(additional_args or {})
        y_cond, mask = model_args.pop("y"), model_args.pop("mask", None)
        return self.denoise(
            model, z, y_cond, y_null, mask, generator, callback, should_cancel, model_kwargs=model_args
        )


class IDDPMSampler:
    """`make_sampler("iddpm", ...)`: IDDPM behind the uniform `sample(model, z, y_cond, ...)` interface.

    (`IDDPM.sample` keeps upstream's signature, so the uniform method lives on this small wrapper.)
    """

    name = "iddpm"

    def __init__(self, num_inference_steps: int, cfg_scale: float = 7.0, cfg_channel: int | None = 3):
        self.iddpm = IDDPM(num_sampling_steps=num_inference_steps, cfg_scale=cfg_scale, cfg_channel=cfg_channel)

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
        return self.iddpm.denoise(model, z, y_cond, y_null, mask, generators, callback, should_cancel)
