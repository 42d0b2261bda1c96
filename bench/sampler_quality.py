"""Fewer model calls at matched quality, measured on the trained demo model (CPU fp32).

1. Convergence: DDIM and DPM-Solver++ at 10…100 steps against a 250-step DDIM run of the same probability-flow
   ODE (same prompts, same noise): mean |Δ| of the decoded frames, in 0–255 units. A sampler that ignored the
   model would stay far from the reference however many steps it took.
2. Quality: every setting through `bora eval` (`demo.evaluate`: held-out phrasings, 16 samples per domain,
   one classifier for all), domain accuracy, Fréchet distance and seconds per sample (batches of 8).
   IDDPM-100 (Bora's own sampler and step count) is the baseline.
3. The pick: the fastest setting within 2 points of IDDPM-100's accuracy and 10% of its Fréchet distance.

Not measured here: a GPU, the real Bora weights (this is the 1.5M-parameter demo model), batch sizes
other than 8. Run: `.venv/bin/python bench/sampler_quality.py [--model demo/weights/bora-demo]`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from demo.evaluate import eval_prompts, evaluate, train_classifier
from model.attention_broadcast import AttentionBroadcastConfig
from model.pipeline import BoraPipeline

BASELINE = ("iddpm", 100, None)
SETTINGS = [  # (sampler, steps, attention broadcast)
    BASELINE,
    ("ddim", 50, None),
    ("ddim", 25, None),
    ("ddim", 15, None),
    ("ddim", 10, None),
    ("dpm-solver++", 25, None),
    ("dpm-solver++", 15, None),
    ("dpm-solver++", 10, None),
    ("ddim", 25, AttentionBroadcastConfig(2, 3, 5)),
    ("ddim", 15, AttentionBroadcastConfig(2, 3, 5)),
    ("dpm-solver++", 15, AttentionBroadcastConfig(2, 3, 5)),
]
CONVERGENCE_STEPS = (10, 15, 25, 50, 100)


def label(sampler: str, steps: int, broadcast: AttentionBroadcastConfig | None) -> str:
    pab = "" if broadcast is None else (f" + PAB {broadcast.spatial_every}/{broadcast.temporal_every}/"
                                        f"{broadcast.cross_every}")
    return f"{sampler}-{steps}{pab}"


def convergence(pipe: BoraPipeline, prompts: list[str]) -> dict[str, float]:
    seeds = list(range(len(prompts)))
    reference = pipe(prompts, seed=seeds, sampler="ddim", num_inference_steps=250).frames.astype(np.float32)
    errors = {}
    for sampler in ("ddim", "dpm-solver++"):
        for steps in CONVERGENCE_STEPS:
            frames = pipe(prompts, seed=seeds, sampler=sampler, num_inference_steps=steps).frames
            errors[f"{sampler}-{steps}"] = float(np.abs(frames.astype(np.float32) - reference).mean())
            print(f"  {sampler}-{steps}: mean |Δ| to DDIM-250 {errors[f'{sampler}-{steps}']:.2f}", flush=True)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo/weights/bora-demo")
    parser.add_argument("--samples-per-domain", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    pipe = BoraPipeline.from_pretrained(args.model, device="cpu")

    print("1. convergence to DDIM-250 (8 held-out prompts, same noise)", flush=True)
    prompts = [p.text for p in eval_prompts(2)]
    errors = convergence(pipe, prompts)

    print("2. quality per setting (bora eval)", flush=True)
    classifier = train_classifier()
    rows = []
    for sampler, steps, broadcast in SETTINGS:
        if broadcast is None:
            pipe.disable_attention_broadcast()
        else:
            pipe.enable_attention_broadcast(broadcast)
        started = time.perf_counter()
        report, _ = evaluate(pipe, args.samples_per_domain, classifier=classifier, sampler=sampler,
                             num_inference_steps=steps)
        rows.append({
            "setting": label(sampler, steps, broadcast), "sampler": sampler, "steps": steps,
            "broadcast": None if broadcast is None else [broadcast.spatial_every, broadcast.temporal_every,
                                                         broadcast.cross_every],
            "accuracy": report.overall["accuracy"],
            "min_domain_accuracy": min(row["accuracy"] for row in report.domains.values()),
            "frechet": report.overall["frechet"],
            "seconds_per_sample": report.overall["seconds_per_sample"],
        })
        print(f"  {rows[-1]['setting']:<28} accuracy {rows[-1]['accuracy']:.1%} FD {rows[-1]['frechet']:.1f} "
              f"{rows[-1]['seconds_per_sample']:.3f} s/sample ({time.perf_counter() - started:.0f} s)", flush=True)
    pipe.disable_attention_broadcast()

    base = rows[0]
    print(f"\n{'setting':<28} {'accuracy':>8} {'worst dom.':>10} {'FD':>7} {'s/sample':>9} {'speed-up':>8} "
          f"{'matched':>7} {'|Δ| to DDIM-250':>15}")
    for row in rows:
        row["speedup"] = base["seconds_per_sample"] / row["seconds_per_sample"]
        row["matched"] = (row["accuracy"] >= base["accuracy"] - 0.02
                          and row["frechet"] <= base["frechet"] * 1.10)
        delta = errors.get(f"{row['sampler']}-{row['steps']}") if row["broadcast"] is None else None
        print(f"{row['setting']:<28} {row['accuracy']:>8.1%} {row['min_domain_accuracy']:>10.1%} "
              f"{row['frechet']:>7.1f} {row['seconds_per_sample']:>9.3f} {row['speedup']:>7.2f}× "
              f"{'yes' if row['matched'] else 'no':>7} {'' if delta is None else f'{delta:.2f}':>15}")
    matched = [row for row in rows if row["matched"]]
    best = min(matched, key=lambda row: row["seconds_per_sample"])
    print(f"\nfastest setting matching IDDPM-100 (accuracy within 2 points, FD within 10%): {best['setting']}, "
          f"{best['speedup']:.2f}× faster per video")
    if args.json:
        args.json.write_text(json.dumps({"convergence": errors, "settings": rows, "pick": best["setting"]},
                                        indent=2))


if __name__ == "__main__":
    main()
