"""Peak memory per stage (T5 encode, STDiT forward, VAE decode), measured, next to `model.memory`'s estimate.

CPU: the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs before each stage,
after malloc_trim returned freed heap pages) minus what was resident before; CUDA: torch.cuda.max_memory_allocated minus allocated before. Weights and
inputs exist before the measurement starts, so the figure is the stage's working memory ("activations").
Random weights, built offline. `--small` (the default on CPU) uses shapes a loaded 2-core machine runs in
seconds; the estimate's formulas are the ones `bora doctor` applies at full scale.

    .venv/bin/python bench/memory_plan.py [--device cuda] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
from pathlib import Path

import torch

from model.memory import T5_XXL, text_encoder_memory, transformer_memory, vae_decode_memory

STDIT = dict(in_channels=4, patch_size=(1, 2, 2), hidden_size=384, depth=2, num_heads=6, caption_channels=4096,
             model_max_length=120, space_scale=0.5, time_scale=1.0)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
T5_SMALL = dict(T5_XXL, d_model=512, d_ff=1024, num_layers=4, num_heads=8)


def _rss_field(name: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{name}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def measure_peak(fn, device: torch.device) -> int:
    """Bytes the call needs beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so reuse shows up in RSS again
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _rss_field("VmRSS")
    fn()
    return _rss_field("VmHWM") - before


def run(device: torch.device, small: bool) -> list[dict]:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = []
    with torch.no_grad():
        # STDiT forward, guidance batch 2
        from model.stdit import STDiT

        latent = (16, 32, 32) if small else (40, 32, 32)
        config = dict(STDIT, input_size=latent) if small else dict(STDIT, input_size=latent, hidden_size=1152,
                                                                    depth=28, num_heads=16)
        model = STDiT(**config).to(device, dtype).eval()
        x = torch.randn(2, 4, *latent, device=device, dtype=dtype)
        y = torch.randn(2, 1, 120, 4096, device=device, dtype=dtype)
        cond = model.prepare_condition(y, torch.ones(1, 120, dtype=torch.long, device=device))
        t = torch.tensor([500, 500], device=device)
        model(x, t, cond)  # warm-up: first-call allocations (kernels, thread pools) are not the stage's
        measured = measure_peak(lambda: model(x, t, cond), device)
        estimate = transformer_memory(config, 2, latent, dtype, materialized_scores=device.type == "cpu")
        rows.append(dict(stage="transformer", shape=f"2x{latent}", measured=measured, estimate=estimate.activations))

        # VAE decode, frame-wise
        from diffusers import AutoencoderKL

        from model.vae import VideoVAE

        side, frames_per_call = (64, 2) if small else (256, 4)
        vae = VideoVAE(AutoencoderKL(**SD_VAE).to(device, dtype), micro_batch_size=frames_per_call)
        z = torch.randn(1, 4, frames_per_call, side // 8, side // 8, device=device)
        vae.decode(z)
        measured = measure_peak(lambda: vae.decode(z), device)
        estimate = vae_decode_memory(dtype, side, side, frames_per_call, SD_VAE)
        rows.append(dict(stage="vae_decode", shape=f"{frames_per_call}x{side}x{side}", measured=measured,
                         estimate=estimate.activations))

        # T5 encoder, 120 tokens (weights dominate; its activations are small)
        from transformers import T5Config, T5EncoderModel

        t5_config = T5_SMALL if small else T5_XXL
        t5 = T5EncoderModel(T5Config(**t5_config)).to(device, torch.float32).eval()
        ids = torch.randint(0, 32000, (1, 120), device=device)
        t5(input_ids=ids)
        measured = measure_peak(lambda: t5(input_ids=ids), device)
        estimate = text_encoder_memory(torch.float32, config=t5_config)
        rows.append(dict(stage="text_encoder", shape="1x120", measured=measured, estimate=estimate.activations))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="full Bora shapes (needs a GPU-sized memory)")
    parser.add_argument("--json", action="store_true", help="one JSON line per stage")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    rows = run(torch.device(args.device), small=not args.full)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print("| stage | shape | measured MiB | estimate MiB | measured/estimate |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['shape']} | {row['measured'] / 2**20:.1f} | {row['estimate'] / 2**20:.1f} | "
              f"{row['measured'] / row['estimate']:.2f} |")
    print("Not measured: the weights themselves (counted exactly by model.memory), CUDA context and allocator "
          "fragmentation (bora doctor keeps 10% + 600 MiB headroom), T5 at XXL width on CPU here.")


if __name__ == "__main__":
    main()
