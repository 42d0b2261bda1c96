"""The stages of bench/gpu.sh: one GPU run that answers issue 12's questions, each stage a markdown table row.

Stages (`--stage NAME`):
- reference: fp16 forward of the upstream reference models (cfg A, B) vs the fp32 reference vectors;
- sdpa:      which SDPA kernels accept upstream's block-diagonal masked cross-attention and our unmasked
             per-group one at Bora's shape, and the time of each;
- xl:        STDiT-XL/2 (random weights) at 40×256×256, IDDPM-100, one prompt: time per step and per video,
             peak memory, MFU against 2.85 PFLOP/video; eager and CUDA graphs;
- batch:     1, 2, 4 prompts per batch: videos/hour;
- compile:   torch.compile on vs off (compile time reported separately);
- t5:        a random-weight T5-XXL-shaped encoder, 120 tokens, on the GPU (bf16) and on the CPU (fp32);
- samplers:  DDIM-25, DPM-Solver++-20 and DDIM-25 with attention broadcast per video next to IDDPM-100.
Everything is built offline (no network). `--tiny` shrinks every model and shape so the whole script runs on
a CPU in about a minute (tests/model/test_gpu_bench.py runs it that way); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
PFLOP_PER_VIDEO = 2.85e15  # STDiT-XL/2, 40×32×32 latent, CFG pair, 100 steps (issue 12)
PEAK_FP16_DENSE = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}

XL = dict(input_size=(40, 32, 32), in_channels=4, patch_size=(1, 2, 2), hidden_size=1152, depth=28, num_heads=16,
          caption_channels=4096, model_max_length=120, space_scale=0.5, time_scale=1.0)
TINY = dict(XL, input_size=(4, 8, 8), hidden_size=64, depth=2, num_heads=4, caption_channels=32)
T5_TINY = dict(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
               feed_forward_proj="gated-gelu", is_encoder_decoder=False)


def row(stage: str, setting: str, value: str) -> None:
    print(f"| {stage} | {setting} | {value} |", flush=True)


class Bench:
    def __init__(self, args):
        self.tiny = args.tiny
        self.device = torch.device(args.device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.config = TINY if self.tiny else XL
        self.steps = 3 if self.tiny else 100
        self.timed_steps = 2 if self.tiny else 10

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def clock(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def peak_reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> str:
        if self.device.type != "cuda":
            return "n/a (CPU)"
        return f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB"

    def mfu(self, seconds_per_video: float) -> str:
        if self.tiny or self.device.type != "cuda":
            return "n/a"
        name = torch.cuda.get_device_name(self.device)
        peak = next((v for k, v in PEAK_FP16_DENSE.items() if k in name), None)
        return "unknown GPU peak" if peak is None else f"{PFLOP_PER_VIDEO / seconds_per_video / peak:.1%} of {name}"

    # -- models ---------------------------------------------------------------------------------------

    def stdit(self):
        """Random-weight STDiT built on `meta` and materialised on the device (no host copy of 3 GB)."""
        from model.stdit import STDiT

        with torch.device("meta"):
            model = STDiT(**self.config)
        model = model.to_empty(device=self.device)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
            grid = model._config_grid
            model.pos_embed.copy_(model._spatial_table(grid[1], grid[2]))
            model.pos_embed_temporal.copy_(model._temporal_table(grid[0]))
            model.y_embedder.y_embedding.normal_(0, 0.02)
        return model.to(self.dtype).eval()

    def inputs(self, prompts: int, model):
        gen = torch.Generator().manual_seed(0)
        latent = self.config["input_size"]
        z = torch.randn(prompts, 4, *latent, generator=gen).to(self.device)
        y = torch.randn(prompts, 1, self.config["model_max_length"], self.config["caption_channels"],
                        generator=gen).to(self.device, self.dtype)
        y_null = model.y_embedder.y_embedding[None, None].expand(prompts, -1, -1, -1)
        mask = torch.zeros(prompts, self.config["model_max_length"], dtype=torch.long, device=self.device)
        mask[:, : min(30, mask.shape[1])] = 1  # a typical prompt: ~30 T5 tokens
        return z, y, y_null, mask

    def step_time(self, denoiser, model, prompts: int = 1) -> tuple[float, float]:
        """(seconds per IDDPM step, seconds for prepare_condition) with guidance, median of timed steps."""
        from model.schedulers.iddpm import IDDPM, guided_output, prepare_caption

        z, y, y_null, mask = self.inputs(prompts, model)
        iddpm = IDDPM(self.steps)
        prepare = self.clock(lambda: prepare_caption(denoiser, torch.cat([y, y_null]), mask))
        condition, _ = prepare_caption(denoiser, torch.cat([y, y_null]), mask)
        t = torch.full((2 * prompts,), 500, dtype=torch.int64, device=self.device)
        noise = torch.randn_like(z)

        def one_step():
            with torch.no_grad():
                out = guided_output(denoiser, z, t, condition, None, 7.0, 3)
                iddpm.p_sample(out, z, 50 % self.steps, noise)

        for _ in range(2):
            one_step()  # warm-up (and CUDA-graph capture)
        return statistics.median(self.clock(one_step) for _ in range(self.timed_steps)), prepare

    def video_time(self, denoiser, model, sampler: str, steps: int) -> float:
        from model.schedulers import make_sampler

        z, y, y_null, mask = self.inputs(1, model)
        run = make_sampler(sampler, steps, 7.0, 3)
        return self.clock(lambda: run.sample(denoiser, z, y, y_null, mask))

    # -- stages ---------------------------------------------------------------------------------------

    def reference(self) -> None:
        from safetensors.torch import load_file

        from model.loading import load_stdit

        for cfg in ("A", "B"):
            config = json.loads((REFERENCE / f"stdit_{cfg}.json").read_text())["config"]
            config = {k: v for k, v in config.items() if not k.startswith("enable_")}
            model = load_stdit(REFERENCE / f"stdit_{cfg}.safetensors", config, device=self.device, dtype=self.dtype)
            vectors = load_file(REFERENCE / f"forward_{cfg}.safetensors")
            for key, mask in (("out_mask", "mask"), ("out_nomask", None), ("out_mask_holes", "mask_holes")):
                with torch.no_grad():
                    out = model(vectors["x"].to(self.device), vectors["timestep"].to(self.device),
                                vectors["y"].to(self.device), vectors[mask].to(self.device) if mask else None)
                ref = vectors[key]
                diff = (out.cpu() - ref).abs().max().item()
                row("reference", f"cfg {cfg} {key} {self.dtype}", f"max abs diff {diff:.2e} (max |ref| "
                    f"{ref.abs().max().item():.2f})")

    def sdpa(self) -> None:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        heads, head_dim = self.config["num_heads"], self.config["hidden_size"] // self.config["num_heads"]
        tokens = 1
        for extent, p in zip(self.config["input_size"], self.config["patch_size"], strict=True):
            tokens *= extent // p
        batch, kept = 2, 30
        q = torch.randn(batch, heads, tokens, head_dim, device=self.device, dtype=self.dtype)
        k = torch.randn(batch, heads, kept, head_dim, device=self.device, dtype=self.dtype)
        v = torch.randn_like(k)
        # upstream: all B·N queries in one sequence, block-diagonal boolean mask over the packed keys
        q_up = q.transpose(0, 1).reshape(1, heads, batch * tokens, head_dim)
        k_up, v_up = (t.transpose(0, 1).reshape(1, heads, batch * kept, head_dim) for t in (k, v))
        blocks = torch.arange(batch, device=self.device)
        mask = blocks.repeat_interleave(tokens)[:, None] == blocks.repeat_interleave(kept)[None, :]
        cases = {"upstream block-diagonal mask": (q_up, k_up, v_up, mask), "ours per group, no mask": (q, k, v, None)}
        for label, (qq, kk, vv, m) in cases.items():
            attend = functools.partial(F.scaled_dot_product_attention, qq, kk, vv, attn_mask=m)
            accepted = []
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                            SDPBackend.MATH):
                try:
                    with sdpa_kernel([backend]):
                        seconds = self.clock(attend)
                    accepted.append(f"{backend.name} {seconds * 1e3:.2f} ms")
                except RuntimeError:
                    continue
            default = self.clock(attend)
            row("sdpa", label, f"accepted: {', '.join(accepted)}; default dispatch {default * 1e3:.2f} ms")

    def xl(self) -> None:
        model = self.stdit()
        modes = {"eager": model}
        if self.device.type == "cuda":
            from model.cuda_graphs import CUDAGraphSTDiT

            modes["cuda graphs"] = CUDAGraphSTDiT(model)
        for label, denoiser in modes.items():
            self.peak_reset()
            step, prepare = self.step_time(denoiser, model)
            per_video = prepare + self.steps * step
            row("xl", f"IDDPM-{self.steps} {label}", f"{step * 1e3:.1f} ms/step, {per_video:.1f} s/video DiT "
                f"(extrapolated from {self.timed_steps} steps), peak {self.peak()}, MFU {self.mfu(per_video)}")
        self.peak_reset()
        seconds = self.video_time(model, model, "iddpm", self.steps)
        row("xl", f"IDDPM-{self.steps} eager, one full video", f"{seconds:.1f} s, peak {self.peak()}, "
            f"MFU {self.mfu(seconds)}")

    def batch(self) -> None:
        model = self.stdit()
        for prompts in (1, 2, 4):
            self.peak_reset()
            step, prepare = self.step_time(model, model, prompts)
            per_batch = prepare + self.steps * step
            row("batch", f"{prompts} prompt(s), CFG batch {2 * prompts}",
                f"{step * 1e3:.1f} ms/step, {3600 * prompts / per_batch:.0f} videos/h DiT-only, peak {self.peak()}")

    def compile(self) -> None:
        model = self.stdit()
        backend = "eager" if self.tiny else "inductor"  # a dry run traces the graph but builds no kernels
        compiled = torch.compile(model, dynamic=False, backend=backend)
        first = self.clock(lambda: self.step_time(compiled, model))
        for label, denoiser in (("off", model), (f"on ({backend})", compiled)):
            step, _ = self.step_time(denoiser, model)
            row("compile", label, f"{step * 1e3:.1f} ms/step")
        row("compile", f"first use, compile included ({backend})", f"{first:.0f} s")

    def t5(self) -> None:
        from transformers import T5Config, T5EncoderModel

        from model.memory import T5_XXL

        config = T5Config(**(T5_TINY if self.tiny else T5_XXL))
        ids = torch.randint(0, 32000, (1, 120))
        places = [("cpu", torch.float32)] + ([(self.device.type, torch.bfloat16)] if self.device.type == "cuda" else [])
        for place, dtype in places:
            device = torch.device(place)
            with torch.device("meta"):
                encoder = T5EncoderModel(config)
            encoder = encoder.to_empty(device=device)
            with torch.no_grad():
                for p in encoder.parameters():
                    p.normal_(0, 0.05)
            encoder = encoder.to(dtype).eval()
            with torch.no_grad():
                encoder(input_ids=ids.to(device))
                seconds = min(self.clock(lambda e=encoder, d=device: e(input_ids=ids.to(d))) for _ in range(2))
            row("t5", f"{'XXL' if not self.tiny else 'tiny'} on {place} {dtype}", f"{seconds * 1e3:.0f} ms / prompt")
            del encoder

    def samplers(self) -> None:
        model = self.stdit()
        base = None
        for sampler, steps in (("iddpm", self.steps), ("ddim", max(1, self.steps // 4)),
                               ("dpm-solver++", max(1, self.steps // 5))):
            seconds = self.video_time(model, model, sampler, steps)
            base = base or seconds
            row("samplers", f"{sampler}-{steps}", f"{seconds:.1f} s/video DiT, {base / seconds:.1f}x vs IDDPM")
        from model.attention_broadcast import AttentionBroadcast, AttentionBroadcastConfig

        model.attention_broadcast = AttentionBroadcast(AttentionBroadcastConfig(2, 3, 5))
        steps = max(1, self.steps // 4)
        seconds = self.video_time(model, model, "ddim", steps)
        row("samplers", f"ddim-{steps} + attention broadcast 2/3/5",
            f"{seconds:.1f} s/video DiT, {base / seconds:.1f}x vs IDDPM")
        model.attention_broadcast = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True,
                        choices=["reference", "sdpa", "xl", "batch", "compile", "t5", "samplers"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models and shapes: a CPU dry run")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --tiny --device cpu for a dry run")
    torch.manual_seed(0)
    getattr(Bench(args), args.stage)()


if __name__ == "__main__":
    main()
