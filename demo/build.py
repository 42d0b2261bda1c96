"""Build the demo model from nothing, seeded: procedural clips → VAE → `bora train` → pipeline folder.

1. write the training set (MP4s + upstream-format CSV, training templates only);
2. train a small 8× `AutoencoderKL` on frames of those clips;
3. assemble a base pipeline folder: that VAE, a random frozen 2-layer T5 (width 64) with a tokenizer whose
   vocabulary covers the caption templates, a fresh STDiT (`DEMO_STDIT`) and the `demo` defaults;
4. train the STDiT on the CSV with the same `Trainer` as `bora train` (from scratch, v-prediction);
5. copy the final pipeline folder (EMA weights) to `out`.

A synthetic-data demo, not a medical model.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

PIPELINE_PARTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler", "model_index.json")


@dataclass
class DemoRecipe:
    clips_per_domain: int = 400
    vae_blocks: tuple[int, ...] = (32, 64, 64, 64)
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_crop: int = 32
    steps: int = 4000
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 100
    decay_steps: int = 1000
    ema_decay: float = 0.998
    prediction: str = "v"
    checkpoint_every: int = 200
    seed: int = 0


# The demo's T5 is random and frozen. At full strength its two random layers blend every token with the
# whole sentence, so a caption's embedding says more about its template than its words, and the STDiT
# learns the five training sentence shapes instead of "ultrasound" or "MRI" (held-out phrasings then
# landed in the wrong domain). Scaled down, each output token stays mostly its own word.
TEXT_CONTEXT_SCALE = 0.1


def keep_words(t5, scale: float):
    """Scale the random T5's attention and feed-forward outputs (what mixes tokens) by `scale`."""
    with torch.no_grad():
        for block in t5.encoder.block:
            block.layer[0].SelfAttention.o.weight.mul_(scale)
            block.layer[1].DenseReluDense.wo.weight.mul_(scale)
    return t5


def build_base(path: Path, vae, seed: int) -> Path:
    """The starting pipeline folder: trained VAE, random frozen T5 + demo tokenizer, fresh STDiT."""
    from demo.captions import corpus
    from model.pipeline import BoraPipeline
    from model.presets import DEMO_DEFAULTS, DEMO_STDIT, DEMO_T5_DIM
    from model.stdit import STDiT
    from model.text_encoder import T5TextEncoder
    from model.tiny import TINY_CORPUS, build_tiny_t5, build_tiny_tokenizer
    from model.vae import VideoVAE

    parts = path / ".parts"
    build_tiny_tokenizer(parts / "tokenizer", vocab_size=1024, corpus=TINY_CORPUS + corpus())
    t5 = build_tiny_t5(parts / "text_encoder", d_model=DEMO_T5_DIM, seed=seed, tokenizer_dir=parts / "tokenizer")
    keep_words(t5, TEXT_CONTEXT_SCALE).save_pretrained(str(parts / "text_encoder"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = STDiT(**DEMO_STDIT)
    pipe = BoraPipeline(
        transformer=transformer.eval(),
        text_encoder=T5TextEncoder.from_pretrained(parts / "text_encoder", parts / "tokenizer"),
        vae=VideoVAE(vae, scale_factor=vae.config.scaling_factor),
        defaults=DEMO_DEFAULTS,
        name="demo",
    )
    pipe.save_pretrained(path)
    shutil.rmtree(parts)
    return path


def build_demo(out: str | Path, work: str | Path, recipe: DemoRecipe | None = None,
               on_step=None) -> Path:
    """Run the whole recipe in `work` (data, base folder, checkpoints) and write the model to `out`."""
    from demo.clips import write_training_set
    from model.training.autoencoder import small_autoencoder, train_autoencoder
    from model.training.trainer import TrainConfig, Trainer

    recipe = recipe or DemoRecipe()
    out, work = Path(out), Path(work)
    torch.manual_seed(recipe.seed)

    started = time.perf_counter()
    csv_path, clips = write_training_set(work / "data", recipe.clips_per_domain, recipe.seed)
    logger.info("wrote %d clips and %s in %.0f s", len(clips), csv_path, time.perf_counter() - started)

    started = time.perf_counter()
    frames = np.concatenate([clip.frames[::4] for clip in clips])  # 4 frames of each clip
    del clips

    def vae_progress(step: int, loss: float) -> None:
        if step % 50 == 0 or step == recipe.vae_steps:
            logger.info("vae step %d/%d loss %.4f (%.2f steps/s)", step, recipe.vae_steps, loss,
                        step / (time.perf_counter() - started))

    vae = train_autoencoder(small_autoencoder(recipe.vae_blocks, seed=recipe.seed), frames, recipe.vae_steps,
                            batch_size=recipe.vae_batch, lr=2e-3, crop=recipe.vae_crop, seed=recipe.seed,
                            on_step=vae_progress)
    logger.info("trained the VAE in %.0f s; scaling_factor %.4f", time.perf_counter() - started,
                vae.config.scaling_factor)
    base = build_base(work / "base", vae, recipe.seed)

    config = TrainConfig(
        data=str(csv_path), pipeline=str(base), out=str(work / "run"), from_scratch=True,
        prediction=recipe.prediction, frame_interval=1, batch_size=recipe.batch_size, lr=recipe.lr,
        warmup_steps=recipe.warmup_steps, decay_steps=recipe.decay_steps, max_steps=recipe.steps,
        ema_decay=recipe.ema_decay, seed=recipe.seed, checkpoint_every=recipe.checkpoint_every, device="cpu",
    )
    final = Trainer(config, on_step=on_step).run()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for part in PIPELINE_PARTS:
        source = final / part
        if source.is_dir():
            shutil.copytree(source, out / part)
        else:
            shutil.copy2(source, out / part)
    return out
