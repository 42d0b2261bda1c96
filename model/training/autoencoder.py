"""Training a small frame VAE (diffusers `AutoencoderKL`) for a model that has no pretrained one.

Bora decodes with SD's VAE; a demo trained on other pictures at toy size needs its own, with the same
interface and 8× downsampling. Loss: pixel MSE + L1 plus a small KL to N(0, I) (SD's autoencoder recipe
without its perceptual and adversarial terms, which need pretrained networks). Afterwards the config's
`scaling_factor` is set to 1 / RMS of the latents, so the diffusion model sees latents of unit scale as it
does with SD's 0.18215.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL


def small_autoencoder(block_out_channels: tuple[int, ...] = (32, 64, 64, 64), latent_channels: int = 4,
                      seed: int = 0) -> AutoencoderKL:
    """SD's layout (2 ** (len(blocks) - 1) spatial factor, mid-block attention) at a fraction of its width."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
            up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
            block_out_channels=block_out_channels, layers_per_block=1, latent_channels=latent_channels,
            norm_num_groups=16, sample_size=64, scaling_factor=1.0,
        )


def train_autoencoder(vae: AutoencoderKL, frames: np.ndarray, steps: int, batch_size: int = 32,
                      lr: float = 1e-3, kl_weight: float = 1e-6, crop: int | None = None, seed: int = 0,
                      on_step: Callable[[int, float], None] | None = None) -> AutoencoderKL:
    """Fit `vae` to uint8 frames [N, H, W, 3] (random batches, random horizontal flips, random `crop`×`crop`
    windows if given: the network is convolutional, so crops cost less and it still runs on whole frames)
    and set its `scaling_factor`; returns it in eval mode."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        batch = frames[rng.integers(0, len(frames), batch_size)]  # [B, H, W, 3]
        if crop is not None:
            top, left = rng.integers(0, frames.shape[1] - crop + 1), rng.integers(0, frames.shape[2] - crop + 1)
            batch = batch[:, top:top + crop, left:left + crop]
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [B, 3, H, W]
        flip = torch.from_numpy(rng.random(batch_size) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = ((recon - x) ** 2).mean() + (recon - x).abs().mean() + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step + 1, loss.item())
    vae.eval()
    with torch.no_grad():
        sample = frames[rng.integers(0, len(frames), min(len(frames), 512))]
        x = torch.from_numpy(sample).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        rms = float(vae.encode(x).latent_dist.mean.square().mean().sqrt())
    vae.register_to_config(scaling_factor=1.0 / rms)
    return vae
