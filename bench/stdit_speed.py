"""STDiT forward time and full sampling time at a mid-size config on this machine (fp32 CPU, fp16 CUDA).

Mid-size config: depth 4, hidden 384, 6 heads, 8×16×16 latent (8 frames × 128×128 video), a CFG batch of 2
(one prompt + its null caption), 120 caption tokens of 4096 channels like T5-XXL. Prints the figures and the
speed-up of DDIM-25 and DPM-Solver++-20 over IDDPM-100, all measured in this one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model.schedulers import make_sampler
from model.stdit import STDiT

CONFIG = dict(input_size=(8, 16, 16), in_channels=4, patch_size=(1, 2, 2), hidden_size=384, depth=4, num_heads=6,
              caption_channels=4096, model_max_length=120, space_scale=0.5, time_scale=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    torch.manual_seed(0)
    model = STDiT(**CONFIG).to(device, dtype).eval()
    n = 1
    z = torch.randn(n, 4, 8, 16, 16, device=device)
    y = torch.randn(n, 1, 120, 4096, device=device, dtype=dtype)
    y_null = model.y_embedder.y_embedding[None].repeat(n, 1, 1)[:, None]
    mask = torch.ones(n, 120, dtype=torch.long, device=device)
    mask[:, 30:] = 0  # a typical prompt is ~30 tokens

    def model_fn(x, t, y_, mask=None):
        return model(x.to(dtype), t, y_, mask)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        x2 = torch.cat([z, z])
        t2 = torch.full((2,), 500, device=device, dtype=torch.long)
        y2 = torch.cat([y, y_null])
        model_fn(x2, t2, y2, mask)  # warm-up
        times = []
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            model_fn(x2, t2, y2, mask)
            sync()
            times.append(time.perf_counter() - start)
        forward = statistics.median(times)
        print(f"device={device} dtype={dtype} threads={torch.get_num_threads()}")
        print(f"STDiT forward (CFG batch 2, 8x16x16 latent, {sum(p.numel() for p in model.parameters()):,} params): "
              f"{forward * 1e3:.1f} ms median of {args.repeats}")

        results = {}
        for name, steps in (("iddpm", 100), ("ddim", 25), ("dpm-solver++", 20)):
            sampler = make_sampler(name, steps, 7.0, 3)
            generator = [torch.Generator().manual_seed(0)]
            sync()
            start = time.perf_counter()
            out = sampler.sample(model_fn, z.clone(), y, y_null, mask, generator)
            sync()
            results[name] = time.perf_counter() - start
            assert torch.isfinite(out).all()
            print(f"sampling {name:>13} {steps:>3} steps: {results[name]:7.2f} s "
                  f"({results[name] / steps * 1e3:.1f} ms/step)")
        for name in ("ddim", "dpm-solver++"):
            print(f"speed-up {name} vs iddpm-100: {results['iddpm'] / results[name]:.2f}x")


if __name__ == "__main__":
    main()
