"""Bora's fine-tuning loop (upstream `scripts/train.py` + `configs/opensora/train/*.py`) on this project's model.

One step: a batch of clips → VAE latents (posterior sample × scale, no grad) and T5 caption embeddings
(no grad, cached per caption) → IDDPM loss with learned sigma (caption dropout inside the STDiT) →
AdamW (weight decay 0) with grad-norm clip → EMA update. fp32 on CPU; bf16 autocast and gradient
checkpointing on CUDA.

Every random draw of step s comes from seeds derived from (seed, s), and the data order from (seed, epoch),
so a run resumed from a checkpoint continues exactly as the uninterrupted run would have.

Output: `out/` is a pipeline folder with the EMA weights; `out/checkpoints/step-N/` are pipeline folders too
(EMA weights) plus `training_state.pt` (weights, EMA, optimizer, step) to resume from. The frozen parts
(text encoder, tokenizer, VAE) are hard-linked from the starting folder where the filesystem allows.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from model.pipeline import BoraPipeline, default_device
from model.stdit import STDiT
from model.training.dataset import VideoTextDataset
from model.training.ema import make_ema, update_ema
from model.training.objective import DiffusionObjective

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
FROZEN_PARTS = ("text_encoder", "tokenizer", "vae")


@dataclass
class TrainConfig:
    """What a run is; upstream's defaults where Bora's config has them (lr 1e-5, batch 4, 40 frames every 3,
    EMA 0.9999, grad clip 1.0). Frames and size default to the starting pipeline's trained shape."""

    data: str  # upstream-format CSV
    pipeline: str  # pipeline folder to start from (its VAE and text encoder are used frozen)
    out: str
    root: str | None = None  # video paths are relative to this (default: the CSV's folder)
    from_scratch: bool = False  # fresh STDiT weights (upstream init) with the folder's architecture
    prediction: str = "epsilon"  # "epsilon" (Bora) or "v"
    num_frames: int | None = None
    frame_interval: int = 3
    height: int | None = None
    width: int | None = None
    batch_size: int = 4
    lr: float = 1e-5
    warmup_steps: int = 0
    decay_steps: int = 0  # the last N steps take the lr linearly towards zero (0: constant after warm-up)
    max_steps: int = 1000
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    seed: int = 0
    checkpoint_every: int = 0  # 0: only the final step
    sample_every: int = 0  # 0: no samples during training
    sample_prompts: list[str] = field(default_factory=list)
    cache_latents: bool = True  # keep each clip's VAE posterior (mean, std); samples are still drawn per step
    text_cache_size: int = 4096
    device: str | None = None
    grad_checkpointing: bool | None = None  # None: on CUDA only

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepReport:
    step: int
    max_steps: int
    loss: float
    mse: float
    vb: float
    lr: float
    steps_per_s: float


StepCallback = Callable[[StepReport], None]
SampleCallback = Callable[[int, list[str], np.ndarray, int], None]  # (step, prompts, frames [B,T,H,W,3], fps)


class Trainer:
    def __init__(self, config: TrainConfig, resume: str | Path | None = None,
                 on_step: StepCallback | None = None, on_sample: SampleCallback | None = None):
        self.config = config
        self.on_step = on_step
        self.on_sample = on_sample
        self.device = torch.device(config.device) if config.device else default_device()
        self.pipe = BoraPipeline.from_pretrained(config.pipeline, device=self.device, torch_dtype=torch.float32)
        defaults = self.pipe.defaults
        self.defaults = replace(
            defaults,
            num_frames=config.num_frames or defaults.num_frames,
            height=config.height or defaults.height,
            width=config.width or defaults.width,
        )
        if config.from_scratch:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                fresh = STDiT.from_config(self.pipe.transformer.config)
            self.pipe.transformer = fresh.to(self.device)
        self.model = self.pipe.transformer.train().requires_grad_(True)
        self.ema = make_ema(self.model)
        self.objective = DiffusionObjective(config.prediction)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=0.0)
        self.dataset = VideoTextDataset(config.data, config.root, self.defaults.num_frames,
                                        config.frame_interval, self.defaults.height, self.defaults.width)
        use_checkpointing = (self.device.type == "cuda" if config.grad_checkpointing is None
                             else config.grad_checkpointing)
        if use_checkpointing:
            _checkpoint_blocks(self.model)
        self.step = 0
        self._latents: dict[tuple[int, int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        self._texts: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._permutations: dict[int, np.ndarray] = {}
        if resume is not None:
            self._load_state(Path(resume) / STATE_FILE)

    # -- data -------------------------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            self._permutations = {epoch: np.random.default_rng([self.config.seed, epoch]).permutation(
                len(self.dataset))}
        return self._permutations[epoch]

    def batch_indices(self, step: int) -> list[int]:
        n, size = len(self.dataset), self.config.batch_size
        positions = range(step * size, (step + 1) * size)
        return [int(self._order(p // n)[p % n]) for p in positions]

    @torch.no_grad()
    def _posterior(self, index: int, start: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior (mean, std) of one clip, [C, T, h, w] each, in fp32 on the device."""
        key = (index, start, flip)
        if key in self._latents:
            return self._latents[key]
        # with the cache on, the flipped twin is encoded too while the video is decoded (one read, not two)
        for twin in (flip, not flip) if self.config.cache_latents else (flip,):
            frames = self.dataset.load(index, start, twin)  # uint8 [T, H, W, 3]
            pixels = frames.permute(0, 3, 1, 2).to(self.device, torch.float32) / 127.5 - 1.0  # [T, 3, H, W]
            dist = self.pipe.vae.vae.encode(pixels).latent_dist
            posterior = (dist.mean.permute(1, 0, 2, 3).contiguous(), dist.std.permute(1, 0, 2, 3).contiguous())
            if twin == flip:
                wanted = posterior
            if self.config.cache_latents:
                self._latents[(index, start, twin)] = posterior
        return wanted

    @torch.no_grad()
    def _text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 embeddings y [B, 1, L, C] and mask [B, L], each caption encoded once."""
        missing = list(dict.fromkeys(c for c in captions if c not in self._texts))
        if missing:
            encoded = self.pipe.text_encoder.encode(missing)
            for i, caption in enumerate(missing):
                self._texts[caption] = (encoded["y"][i].clone(), encoded["mask"][i].clone())
        for caption in captions:
            self._texts.move_to_end(caption)
        y = torch.stack([self._texts[c][0] for c in captions]).to(self.device)  # [B, 1, L, C]
        mask = torch.stack([self._texts[c][1] for c in captions]).to(self.device)  # [B, L]
        while len(self._texts) > self.config.text_cache_size:
            self._texts.popitem(last=False)
        return y, mask

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents x0 [B, C, T, h, w], captions y [B, 1, L, C] and mask [B, L] of step `step`."""
        rng = np.random.default_rng([self.config.seed, step, 1])
        generator = torch.Generator().manual_seed(_step_seed(self.config.seed, step, 2))
        indices = self.batch_indices(step)
        latents = []
        for index in indices:
            start, flip = self.dataset.window(index, rng)
            mean, std = self._posterior(index, start, flip)
            noise = torch.randn(mean.shape, generator=generator).to(self.device)
            latents.append((mean + std * noise) * self.pipe.vae.scale_factor)
        y, mask = self._text([self.dataset.samples[i].caption for i in indices])
        return torch.stack(latents), y, mask

    # -- training ---------------------------------------------------------------------------------------

    def _lr(self, step: int) -> float:
        if self.config.warmup_steps and step < self.config.warmup_steps:
            return self.config.lr * (step + 1) / self.config.warmup_steps
        left = self.config.max_steps - step
        if self.config.decay_steps and left <= self.config.decay_steps:
            return self.config.lr * left / self.config.decay_steps
        return self.config.lr

    def train_step(self) -> dict[str, float]:
        """One optimisation step; returns the batch-mean loss terms."""
        step = self.step
        x0, y, mask = self.batch(step)
        torch.manual_seed(_step_seed(self.config.seed, step, 3))  # caption dropout draws from the global RNG
        generator = torch.Generator(self.device).manual_seed(_step_seed(self.config.seed, step, 4))
        lr = self._lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            terms = self.objective.loss(self.model, x0, y, mask, generator)
        loss = terms["loss"].mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        update_ema(self.ema, self.model, self.config.ema_decay)
        self.step += 1
        return {"loss": loss.item(), "mse": terms["mse"].mean().item(), "vb": terms["vb"].mean().item(), "lr": lr}

    def run(self) -> Path:
        """Train to `max_steps`, checkpointing and sampling on the way; write the final pipeline folder."""
        config = self.config
        started, first_step = time.perf_counter(), self.step
        logger.info("training from step %d to %d on %s: %d clips, batch %d", self.step, config.max_steps,
                    self.device, len(self.dataset), config.batch_size)
        while self.step < config.max_steps:
            terms = self.train_step()
            rate = (self.step - first_step) / max(time.perf_counter() - started, 1e-9)
            if self.on_step is not None:
                self.on_step(StepReport(self.step, config.max_steps, terms["loss"], terms["mse"], terms["vb"],
                                        terms["lr"], rate))
            if config.checkpoint_every and self.step % config.checkpoint_every == 0 \
                    and self.step < config.max_steps:
                self.save_checkpoint(Path(config.out) / "checkpoints" / f"step-{self.step:06d}")
            if config.sample_every and config.sample_prompts and self.step % config.sample_every == 0:
                self.sample(config.sample_prompts)
        final = Path(config.out)
        self.save_checkpoint(final / "checkpoints" / f"step-{self.step:06d}")
        self.save_pipeline(final)
        return final

    # -- outputs ----------------------------------------------------------------------------------------

    def ema_pipeline(self) -> BoraPipeline:
        return BoraPipeline(self.ema, self.pipe.text_encoder, self.pipe.vae, self.defaults,
                            name=self.pipe.name, prediction_type=self.config.prediction)

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int = 0) -> np.ndarray:
        """Generate one video per prompt with the EMA weights and the pipeline's defaults."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            frames = self.ema_pipeline()(list(prompts), seed=seed).frames
        if self.on_sample is not None:
            self.on_sample(self.step, list(prompts), frames, self.defaults.fps)
        return frames

    def save_pipeline(self, path: Path) -> None:
        """A pipeline folder with the EMA weights; frozen parts linked from the starting folder."""
        path.mkdir(parents=True, exist_ok=True)
        pipe = self.ema_pipeline()
        pipe.transformer.save_pretrained(path / "transformer")
        source = Path(self.config.pipeline)
        for part in FROZEN_PARTS:
            _link_tree(source / part, path / part)
        pipe.save_configs(path)

    def save_checkpoint(self, path: Path) -> None:
        self.save_pipeline(path)
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": self.config.to_dict(),
        }
        torch.save(state, path / STATE_FILE)
        (path / "training_config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        logger.info("checkpoint at step %d: %s", self.step, path)

    def _load_state(self, state_file: Path) -> None:
        from model.errors import CheckpointError

        if not state_file.is_file():
            raise CheckpointError(f"{state_file.parent} is not a training checkpoint: {STATE_FILE} is missing")
        state = torch.load(state_file, map_location=self.device, weights_only=True)
        if state["config"]["prediction"] != self.config.prediction:
            raise CheckpointError(f"{state_file.parent} was trained with prediction="
                                  f"{state['config']['prediction']!r}, this run asks for {self.config.prediction!r}")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        logger.info("resumed from %s at step %d", state_file.parent, self.step)


def _step_seed(seed: int, step: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _checkpoint_blocks(model: STDiT) -> None:
    """Recompute each STDiT block's activations in the backward pass (upstream `grad_checkpointing`), by
    wrapping the blocks' forward from outside so the weights and their names stay as they are."""
    for block in model.blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed


def _link_tree(source: Path, destination: Path) -> None:
    """Copy a folder as hard links (a copy where linking fails: another filesystem)."""
    if destination.exists():
        shutil.rmtree(destination)
    for file in source.rglob("*"):
        target = destination / file.relative_to(source)
        if file.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, target)
        except OSError:
            shutil.copy2(file, target)

