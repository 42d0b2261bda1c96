"""The frame-wise image VAE Bora decodes with (Open-Sora 1.0 ``VideoAutoencoderKL``).

Upstream (``opensora/models/vae/vae.py``) folds time into the batch, runs SD's 2-D
``AutoencoderKL`` on micro-batches of frames and scales latents by a fixed 0.18215 (not the
config's ``scaling_factor``). Here a folder's ``scaling_factor`` is used, which is that same 0.18215 in
sd-vae-ft-ema's config; a smaller VAE (the demo's) brings its own. ``save_sample`` then maps ``[-1, 1]`` to bytes with
``clamp(-1, 1)``, ``(x + 1) / 2 * 255 + 0.5`` and a truncating cast; :meth:`VideoVAE.decode` does
the same in fp32, micro-batch by micro-batch, so a long video never holds all decoded frames
on the accelerator at once.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from diffusers import AutoencoderKL


class VideoVAE:
    """Latent videos ``[B, C, T, h, w]`` ⇄ uint8 frames ``[B, T, H, W, 3]`` with ``H = h * spatial_factor``.

    Args:
        vae: the image autoencoder (kept on its device and dtype; fp32 or fp16 both work).
        scale_factor: latents are ``vae latents * scale_factor`` (SD's 0.18215, as upstream).
        micro_batch_size: frames per VAE call; ``None`` runs all ``B * T`` frames at once. The
            result does not depend on it (up to the backend's batch-size numerics).
    """

    def __init__(self, vae: AutoencoderKL, scale_factor: float = 0.18215, micro_batch_size: int | None = 4):
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
        self.vae = vae.eval().requires_grad_(False)
        self.scale_factor = scale_factor
        self.micro_batch_size = micro_batch_size

    @classmethod
    def from_pretrained(
        cls,
        vae_dir: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        scale_factor: float | None = None,
        micro_batch_size: int | None = 4,
    ) -> VideoVAE:
        """Load an ``AutoencoderKL`` folder (local files only). The latent scale is the config's
        ``scaling_factor`` (0.18215 in sd-vae-ft-ema's, as upstream hard-codes) unless given."""
        vae = AutoencoderKL.from_pretrained(
            str(vae_dir),
            local_files_only=True,
            torch_dtype=dtype,
            # diffusers warns when asked for the low-memory path without accelerate installed
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
        )
        if device is not None:
            vae = vae.to(device)
        if scale_factor is None:
            scale_factor = float(vae.config.get("scaling_factor") or 0.18215)
        return cls(vae, scale_factor=scale_factor, micro_batch_size=micro_batch_size)

    def save_pretrained(self, vae_dir: str | Path) -> None:
        self.vae.save_pretrained(str(vae_dir))

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along H and W: 2 ** (number of down blocks - 1), 8 for SD."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def _chunks(self, n: int) -> list[slice]:
        step = n if self.micro_batch_size is None else self.micro_batch_size
        return [slice(i, min(i + step, n)) for i in range(0, n, max(step, 1))]

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, T, h, w]`` → uint8 frames ``[B, T, h*f, w*f, 3]`` on the CPU."""
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents [B, {self.latent_channels}, T, h, w], got shape {tuple(z.shape)}"
            )
        b, c, t, h, w = z.shape
        frames = z.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # [B, C, T, h, w] -> [(B T), C, h, w]
        out = []
        for chunk in self._chunks(b * t):
            latents = frames[chunk].to(device=self.device, dtype=self.dtype) / self.scale_factor
            x = self.vae.decode(latents).sample.float()  # [m, 3, H, W] in about [-1, 1]
            # upstream save_sample: clamp, map [-1, 1] -> [0, 255], +0.5 then truncate (round half up)
            x = ((x.clamp(-1, 1) + 1) / 2).mul(255).add(0.5).clamp(0, 255)
            out.append(x.permute(0, 2, 3, 1).to("cpu", torch.uint8))  # [m, 3, H, W] -> [m, H, W, 3]
        video = torch.cat(out)  # [(B T), H, W, 3]
        return video.reshape(b, t, *video.shape[1:])  # [(B T), H, W, 3] -> [B, T, H, W, 3]

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 frames ``[B, T, H, W, 3]`` → scaled latents ``[B, C, T, H/f, W/f]`` (inverse of decode).

        Without a generator the posterior mean is returned (deterministic); with one, a sample
        from it, as upstream's ``latent_dist.sample()``.
        """
        if frames.ndim != 5 or frames.shape[-1] != 3:
            raise ValueError(f"expected frames [B, T, H, W, 3], got shape {tuple(frames.shape)}")
        b, t, height, width, _ = frames.shape
        pixels = frames.reshape(b * t, height, width, 3).permute(0, 3, 1, 2)  # -> [(B T), 3, H, W]
        out = []
        for chunk in self._chunks(b * t):
            x = pixels[chunk].to(device=self.device, dtype=torch.float32) / 127.5 - 1.0  # [0, 255] -> [-1, 1]
            dist = self.vae.encode(x.to(self.dtype)).latent_dist
            latents = dist.mode() if generator is None else dist.sample(generator=generator)
            out.append(latents * self.scale_factor)  # [m, C, h, w]
        z = torch.cat(out)  # [(B T), C, h, w]
        return z.reshape(b, t, *z.shape[1:]).permute(0, 2, 1, 3, 4)  # -> [B, C, T, h, w]
