"""The training objective of Bora / Open-Sora 1.0: IDDPM `training_losses` with learned sigma.

Upstream (`opensora/schedulers/iddpm`, improved-diffusion's `GaussianDiffusion.training_losses` with
`learn_sigma=True`, `loss_type=MSE`, no timestep rescaling): over the 1000-step linear β schedule,

    x_t  = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε,  t ~ U{0..999}
    loss = mean((target − out[:, :C])²) + vb

where `vb` is the variational bound term for the learned variance `out[:, C:]` with the predicted mean
frozen (stop-gradient), in bits per dimension: KL(q(x_{t−1}|x_t, x0) ‖ p(x_{t−1}|x_t)) for t > 0 and the
discretised Gaussian decoder NLL at t = 0 (Nichol & Dhariwal 2021, eq. 16).

`prediction="epsilon"` (upstream, what Bora's weights expect) regresses ε. `prediction="v"` regresses
v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0 (Salimans & Ho 2022) with the same variance head and VLB term; samplers
convert it back to ε (`epsilon_from_v`), so a v model runs through the same IDDPM/DDIM/DPM-Solver code.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from model.schedulers.iddpm import NUM_TRAIN_TIMESTEPS, linear_betas

PREDICTIONS = ("epsilon", "v")


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantised to 256 bins under N(means, e^(2·log_scales)), elementwise."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class DiffusionObjective:
    """`loss(model, x0, y, mask, generator)` → per-sample loss terms, as upstream `training_losses`."""

    def __init__(self, prediction: str = "epsilon", num_timesteps: int = NUM_TRAIN_TIMESTEPS):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r} must be one of {PREDICTIONS}")
        self.prediction = prediction
        self.num_timesteps = num_timesteps
        betas = linear_betas(num_timesteps)  # float64, upstream's tables
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        tables = {
            "sqrt_ac": np.sqrt(alphas_cumprod),
            "sqrt_1m_ac": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_ac": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_ac": np.sqrt(1.0 / alphas_cumprod - 1.0),
            "coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
            "posterior_log_variance": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            "log_betas": np.log(betas),
        }
        # upstream `_extract_into_tensor`: index the float64 table, then `.float()`
        self._tables = {name: torch.from_numpy(value).float() for name, value in tables.items()}

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table `name` at timesteps t [B], shaped [B, 1, ..., 1] to broadcast against `like`."""
        values = self._tables[name].to(t.device)[t]
        return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at("sqrt_ac", t, x0) * x0 + self._at("sqrt_1m_ac", t, x0) * noise

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.prediction == "epsilon":
            return noise
        return self._at("sqrt_ac", t, x0) * noise - self._at("sqrt_1m_ac", t, x0) * x0

    def predict_xstart(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.prediction == "epsilon":
            return self._at("sqrt_recip_ac", t, x_t) * x_t - self._at("sqrt_recipm1_ac", t, x_t) * out
        return self._at("sqrt_ac", t, x_t) * x_t - self._at("sqrt_1m_ac", t, x_t) * out

    def _vb_bits(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, pred_x0: torch.Tensor,
                 var_values: torch.Tensor) -> torch.Tensor:
        """Per-sample VLB term in bits/dim; the mean is frozen, only the variance head gets gradient."""
        coef1, coef2 = self._at("coef1", t, x0), self._at("coef2", t, x0)
        true_mean = coef1 * x0 + coef2 * x_t
        min_log = self._at("posterior_log_variance", t, x0)
        max_log = self._at("log_betas", t, x0)
        model_mean = coef1 * pred_x0 + coef2 * x_t
        frac = (var_values + 1) / 2  # LEARNED_RANGE
        model_log_variance = frac * max_log + (1 - frac) * min_log
        kl = _mean_flat(normal_kl(true_mean, min_log, model_mean, model_log_variance)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
        nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def loss(self, model, x0: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draw t and ε, run the model on x_t and return {"loss", "mse", "vb"} per sample [B]."""
        batch, channels = x0.shape[:2]
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        model_output = model(x_t, t, y, mask).float()  # [B, 2C, T, H, W]
        if model_output.shape[1] != 2 * channels:
            raise ValueError(f"the objective needs a learned-sigma model (pred_sigma=True, 2·{channels} output "
                             f"channels); it returned {model_output.shape[1]}")
        out, var_values = model_output[:, :channels], model_output[:, channels:]
        mse = _mean_flat((self.target(x0, t, noise) - out) ** 2)
        pred_x0 = self.predict_xstart(x_t, t, out.detach())
        vb = self._vb_bits(x0, x_t, t, pred_x0, var_values)
        return {"loss": mse + vb, "mse": mse, "vb": vb, "t": t}


def epsilon_from_v(v: torch.Tensor, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """ε = sqrt(ᾱ_t)·v + sqrt(1 − ᾱ_t)·x_t, with t the 1000-step training timestep [B]."""
    alphas_cumprod = np.cumprod(1.0 - linear_betas(NUM_TRAIN_TIMESTEPS))
    table = torch.from_numpy(alphas_cumprod).float().to(timestep.device)
    ac = table[timestep.long()].reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.device, x_t.dtype)
    return ac.sqrt() * v + (1 - ac).sqrt() * x_t
