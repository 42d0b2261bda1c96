"""Our STDiT step vs upstream's STDiT formulation, side by side in one process, interleaved rounds.

Cases (the configs of issue 12; hidden 384, 6 heads, 120 caption slots of 4096 channels like T5-XXL):
- forward-512:  depth 4, 8×16×16 latent (512 tokens), batch 2, captions with 20 and 35 kept tokens;
- step-512:     one IDDPM step (CFG: one prompt with 35 kept tokens + its null caption = batch 2), same model;
- forward-4096: depth 2, 16×32×32 latent (4096 tokens), batch 2, 20 / 35 kept tokens;
- step-4096:    one IDDPM step at that config.
"upstream" is `bench/upstream_stdit.py` (upstream's formulation on the same weights); "ours" is `STDiT`.
A step of ours is the guided model call on the prepared caption condition plus the update rule, plus
1/100 of `prepare_condition` (done once per IDDPM-100 video); upstream embeds the caption every step.

    .venv/bin/python bench/stdit_speed.py [--rounds 7] [--threads 2] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from upstream_stdit import UpstreamSTDiT  # bench/ sibling (run as a script)

from model.schedulers.iddpm import IDDPM, guided_output, prepare_caption
from model.stdit import STDiT

WIDTH = dict(in_channels=4, patch_size=(1, 2, 2), hidden_size=384, num_heads=6, caption_channels=4096,
             model_max_length=120, space_scale=0.5, time_scale=1.0)
STEPS_PER_VIDEO = 100

NOT_MEASURED = """Not measured here: GPU / fp16 (bench/gpu.sh), T5 and VAE time, full STDiT-XL/2 width (1152) and
depth (28), torch.compile (unless --compile), captions other than 20/35 kept tokens (ours folds the q/out
projections into the keys/values while 6·kept < 384; longer captions use the unfolded path), and the
load of other processes on this machine (rounds are interleaved so both sides see the same load)."""


def make_model(depth: int, latent: tuple[int, int, int]) -> STDiT:
    torch.manual_seed(0)
    model = STDiT(input_size=latent, depth=depth, **WIDTH).eval()
    with torch.no_grad():  # upstream zero-inits some projections; give them weights so every path computes
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    return model


def masks(kept: list[int]) -> torch.Tensor:
    mask = torch.zeros(len(kept), 120, dtype=torch.long)
    for row, count in enumerate(kept):
        mask[row, :count] = 1
    return mask


class Case:
    def __init__(self, name: str, depth: int, latent: tuple[int, int, int], step: bool):
        self.name, self.step = name, step
        self.model = make_model(depth, latent)
        self.upstream = UpstreamSTDiT(self.model)
        gen = torch.Generator().manual_seed(1)
        if step:  # one prompt + its null caption
            self.x = torch.randn(1, 4, *latent, generator=gen)
            self.y_cond = torch.randn(1, 1, 120, 4096, generator=gen)
            self.y_null = self.model.y_embedder.y_embedding[None, None]
            self.mask = masks([35])
            self.iddpm = IDDPM(STEPS_PER_VIDEO, cfg_scale=7.0, cfg_channel=3)
            self.noise = torch.randn(self.x.shape, generator=gen)
        else:
            self.x = torch.randn(2, 4, *latent, generator=gen)
            self.y = torch.randn(2, 1, 120, 4096, generator=gen)
            self.mask = masks([20, 35])
            self.t = torch.tensor([999, 421])

    def run(self, model, prepared=None):
        with torch.no_grad():
            if not self.step:
                return model(self.x, self.t, self.y if prepared is None else prepared,
                             self.mask if prepared is None else None)
            y = torch.cat([self.y_cond, self.y_null])
            mask = self.mask if prepared is None else None
            t = torch.full((2,), 500, dtype=torch.int64)
            out = guided_output(model, self.x, t, y if prepared is None else prepared, mask, 7.0, 3)
            return self.iddpm.p_sample(out, self.x, 45, self.noise)

    def prepare(self):
        if self.step:
            return prepare_caption(self.model, torch.cat([self.y_cond, self.y_null]), self.mask)[0]
        with torch.no_grad():
            return self.model.prepare_condition(self.y, self.mask)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    parser.add_argument("--cases", default="forward-512,step-512,forward-4096,step-4096")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    specs = {"forward-512": (4, (8, 16, 16), False), "step-512": (4, (8, 16, 16), True),
             "forward-4096": (2, (16, 32, 32), False), "step-4096": (2, (16, 32, 32), True)}
    cases = [Case(name, *specs[name]) for name in args.cases.split(",")]
    print(f"torch {torch.__version__}, CPU fp32, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")

    variants = ["upstream", "ours"] + (["ours+compile"] if args.compile else [])
    compiled = {}
    prepared, prepare_s = {}, {}
    for case in cases:  # warm-up, agreement check, prepare cost
        prepared[case.name] = case.prepare()
        prepare_s[case.name] = min(timed(case.prepare) for _ in range(2))
        ref, ours = case.run(case.upstream), case.run(case.model, prepared[case.name])
        diff = (ref - ours).abs().max().item()
        print(f"{case.name:>13}: max |ours - upstream| = {diff:.2e} (max |out| {ref.abs().max().item():.2f}), "
              f"prepare_condition {prepare_s[case.name] * 1e3:.1f} ms once per video")
        if args.compile:
            compiled[case.name] = torch.compile(case.model)
            case.run(compiled[case.name], prepared[case.name])

    times = {(c.name, v): [] for c in cases for v in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for case in cases:
            for variant in order:
                if variant == "upstream":
                    fn = lambda c=case: c.run(c.upstream)  # noqa: E731
                else:
                    model = compiled[case.name] if variant == "ours+compile" else case.model
                    fn = lambda c=case, m=model: c.run(m, prepared[c.name])  # noqa: E731
                extra = prepare_s[case.name] / STEPS_PER_VIDEO if case.step else 0.0
                times[(case.name, variant)].append(timed(fn) + extra)

    print(f"\n| case | {' | '.join(v + ' ms' for v in variants)} | upstream/ours | per-round ratio (min..max) |")
    print("|---|" + "---|" * (len(variants) + 2))
    for case in cases:
        med = {v: statistics.median(times[(case.name, v)]) for v in variants}
        ratios = [u / o for u, o in zip(times[(case.name, "upstream")], times[(case.name, "ours")], strict=True)]
        cells = " | ".join(f"{med[v] * 1e3:.0f}" for v in variants)
        print(f"| {case.name} | {cells} | {med['upstream'] / med['ours']:.2f}x | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f}) |")
    if args.compile:
        for case in cases:
            u, c = statistics.median(times[(case.name, "upstream")]), statistics.median(times[(case.name, "ours+compile")])
            print(f"{case.name}: upstream/ours+compile {u / c:.2f}x")
    print("\n" + NOT_MEASURED)


if __name__ == "__main__":
    main()
