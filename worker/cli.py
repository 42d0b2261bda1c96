"""The `bora` command line: generate a video, inspect/convert checkpoints, build model folders, run the service.

Model imports happen inside the commands so `bora serve` and `bora keys` start without loading torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from service.keys import keys_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_enable=False)
app.add_typer(keys_app, name="keys")
_show_tracebacks = False


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback when a command fails")] = False,
) -> None:
    global _show_tracebacks
    _show_tracebacks = debug


def main() -> None:
    """The `bora` entry point: a failing command prints one line and exits 1 (`bora --debug ...`: the traceback)."""
    try:
        app()
    except Exception as error:
        if _show_tracebacks:
            raise
        typer.echo(f"error: {error} ({type(error).__name__}; run `bora --debug ...` for the traceback)", err=True)
        sys.exit(1)

DEFAULT_TINY_DIR = Path("data/models/tiny")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What the video shows")],
    out: Annotated[Path, typer.Option("--out", "-o", help="MP4 file to write")] = Path("video.mp4"),
    model: Annotated[Path, typer.Option(help="Pipeline folder (built with make-tiny or assemble)")] = DEFAULT_TINY_DIR,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (preset default if unset)")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (random if unset; printed)")] = None,
    sampler: Annotated[str | None, typer.Option(help="iddpm | ddim | dpm-solver++")] = None,
    frames: Annotated[int | None, typer.Option(help="Number of frames")] = None,
    height: Annotated[int | None, typer.Option()] = None,
    width: Annotated[int | None, typer.Option()] = None,
    guidance_scale: Annotated[float | None, typer.Option()] = None,
    fps: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: cuda if available)")] = None,
) -> None:
    """Generate one video from a prompt and write it as an H.264 MP4."""
    from tqdm import tqdm

    from model.errors import BoraModelError
    from model.pipeline import BoraPipeline
    from model.presets import make_tiny
    from worker.limits import generation_limits
    from worker.video import encode_mp4

    if model == DEFAULT_TINY_DIR and not (model / "model_index.json").exists():
        typer.echo(f"building the tiny model in {model}", err=True)
        make_tiny(model)
    pipe = BoraPipeline.from_pretrained(model, device=device)
    bar = tqdm(unit="step", desc="denoising")

    def on_step(_pipe, step_index: int, _timestep: int, total: int) -> None:
        bar.total = total
        bar.update(1)

    try:
        result = pipe(prompt, num_frames=frames, height=height, width=width, num_inference_steps=steps,
                      guidance_scale=guidance_scale, sampler=sampler, seed=seed, callback_on_step_end=on_step,
                      limits=generation_limits(pipe.name))
    except BoraModelError as error:
        raise typer.BadParameter(str(error)) from error
    finally:
        bar.close()
    fps = fps or pipe.defaults.fps
    encode_mp4(result.frames[0], fps, out, {"title": prompt, "comment": "synthetic — AI-generated"})
    _, n_frames, h, w, _ = result.frames.shape
    typer.echo(f"wrote {out}: {n_frames} frames {w}x{h} @ {fps} fps, seed {result.seeds[0]}")


@app.command()
def inspect(checkpoint: Path) -> None:
    """Print a checkpoint's format, key count, parameter count, dtypes and inferred STDiT config."""
    from model.loading import inspect_checkpoint

    typer.echo(json.dumps(inspect_checkpoint(checkpoint), indent=2, default=str))


@app.command()
def convert(source: Path, destination: Path) -> None:
    """Convert any supported checkpoint format to one upstream-named .safetensors file."""
    from model.loading import convert_to_safetensors

    convert_to_safetensors(source, destination)
    typer.echo(f"wrote {destination}")


@app.command("make-tiny")
def make_tiny_command(path: Annotated[Path, typer.Argument()] = DEFAULT_TINY_DIR) -> None:
    """Build the tiny pipeline folder (random weights, fixed seeds, no downloads)."""
    from model.presets import make_tiny

    make_tiny(path)
    typer.echo(f"wrote {path}")


@app.command()
def assemble(
    checkpoint: Annotated[Path, typer.Option(help="Bora checkpoint (ema.pt, .pth, .safetensors or a folder)")],
    vae: Annotated[Path, typer.Option(help="The sd-vae-ft-ema folder")],
    t5: Annotated[Path, typer.Option(help="The t5-v1_1-xxl folder")],
    out: Annotated[Path, typer.Option(help="Pipeline folder to write")],
) -> None:
    """Assemble a `bora` pipeline folder from the three upstream downloads, checking each part."""
    from model.presets import assemble_bora

    assemble_bora(checkpoint, vae, t5, out)
    typer.echo(f"wrote {out}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def submit(ctx: typer.Context) -> None:
    """Submit a job to a running service: bora submit "prompt" --wait --out video.mp4 (see --help)."""
    from bora_client.cli import submit_main

    raise typer.Exit(submit_main(ctx.args))


@app.command()
def doctor(
    gpu_memory: Annotated[float | None, typer.Option(
        help="Device memory in GiB (default: the visible CUDA device's; required without one)")] = None,
    frames: Annotated[int, typer.Option(help="Frames per video")] = 40,
    height: Annotated[int, typer.Option()] = 256,
    width: Annotated[int, typer.Option()] = 256,
    prompts: Annotated[int, typer.Option(help="Videos generated together (a batch)")] = 1,
    vae_frames_per_call: Annotated[int, typer.Option(help="Frames per VAE decode call")] = 4,
    model: Annotated[Path | None, typer.Option(
        help="Pipeline folder whose transformer config to plan for (default: Bora's STDiT-XL/2)")] = None,
) -> None:
    """Say whether a GPU of a given memory can serve a video shape, and how (where T5 goes, VAE chunking)."""
    import torch

    from model.memory import gib, plan
    from model.presets import BORA_STDIT

    if gpu_memory is None:
        if not torch.cuda.is_available():
            raise typer.BadParameter("no CUDA device visible: pass --gpu-memory GIB", param_hint="--gpu-memory")
        device_bytes = torch.cuda.get_device_properties(0).total_memory
    else:
        device_bytes = int(gpu_memory * 2**30)
    config = dict(BORA_STDIT)
    if model is not None:
        config_file = model / "transformer" / "config.json"
        if not config_file.is_file():
            raise typer.BadParameter(f"{config_file} not found", param_hint="--model")
        config = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}
    result = plan(device_bytes, config, frames, height, width, prompts=prompts,
                  vae_frames_per_call=vae_frames_per_call)
    typer.echo(f"device {gib(device_bytes)}; {prompts} x {frames} frames {width}x{height}, fp16 DiT and VAE, "
               f"guidance batch {2 * prompts}")
    for stage in result.stages:
        place = "cpu" if stage.stage == "text_encoder" and not result.text_encoder_on_device else "gpu"
        typer.echo(f"  {stage.stage:<13} {place}  weights {gib(stage.weights):>10}  "
                   f"peak activations {gib(stage.activations):>10}")
    typer.echo(f"  peak on the device: {gib(result.peak)} (+ CUDA context)")
    typer.echo(("fits" if result.fits else "does NOT fit") + (": " + "; ".join(result.advice) if result.advice else ""))
    if not result.fits:
        raise typer.Exit(1)


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="CSV without header: video path, caption (upstream's format)")],
    pipeline: Annotated[Path, typer.Option(help="Pipeline folder to start from (Bora, tiny, demo)")],
    out: Annotated[Path, typer.Option(help="Output folder: the trained pipeline, checkpoints/, samples/")],
    root: Annotated[Path | None, typer.Option(help="Video paths are relative to this (default: the CSV's folder)")] = None,
    from_scratch: Annotated[bool, typer.Option(help="Fresh STDiT weights with the folder's architecture")] = False,
    prediction: Annotated[str, typer.Option(help="epsilon (Bora's objective) | v")] = "epsilon",
    num_frames: Annotated[int | None, typer.Option(help="Frames per clip (default: the pipeline's)")] = None,
    frame_interval: Annotated[int, typer.Option(help="Take every n-th frame")] = 3,
    height: Annotated[int | None, typer.Option()] = None,
    width: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int, typer.Option()] = 4,
    lr: Annotated[float, typer.Option()] = 1e-5,
    warmup_steps: Annotated[int, typer.Option()] = 0,
    decay_steps: Annotated[int, typer.Option(help="The last N steps take the lr linearly towards zero")] = 0,
    max_steps: Annotated[int, typer.Option()] = 1000,
    ema_decay: Annotated[float, typer.Option()] = 0.9999,
    grad_clip: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: the final one only)")] = 0,
    sample_every: Annotated[int, typer.Option(help="Steps between sample MP4s (0: none)")] = 0,
    sample_prompt: Annotated[list[str] | None, typer.Option(help="Prompt for the samples (repeatable)")] = None,
    cache_latents: Annotated[bool, typer.Option(help="Keep each clip's VAE posterior in memory")] = True,
    resume: Annotated[Path | None, typer.Option(help="Checkpoint folder (out/checkpoints/step-N) to resume")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda (default: cuda if available)")] = None,
) -> None:
    """Fine-tune (or train) the STDiT on text–video pairs with Bora's recipe; writes a pipeline folder."""
    from tqdm import tqdm

    from model.errors import BoraModelError
    from model.training.trainer import StepReport, TrainConfig, Trainer
    from worker.video import SYNTHETIC_LABEL, encode_mp4

    config = TrainConfig(
        data=str(data), pipeline=str(pipeline), out=str(out), root=str(root) if root else None,
        from_scratch=from_scratch, prediction=prediction, num_frames=num_frames, frame_interval=frame_interval,
        height=height, width=width, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
        decay_steps=decay_steps, max_steps=max_steps, grad_clip=grad_clip, ema_decay=ema_decay, seed=seed,
        checkpoint_every=checkpoint_every,
        sample_every=sample_every, sample_prompts=list(sample_prompt or []), cache_latents=cache_latents,
        device=device,
    )
    bar = tqdm(total=max_steps, unit="step", desc="training")

    def on_step(report: StepReport) -> None:
        bar.n = report.step
        bar.set_postfix(loss=f"{report.loss:.4f}", it_s=f"{report.steps_per_s:.2f}", refresh=False)
        bar.refresh()

    def on_sample(step: int, prompts: list[str], frames, fps: int) -> None:
        folder = out / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        for i, prompt in enumerate(prompts):
            encode_mp4(frames[i], fps, folder / f"step-{step:06d}-{i}.mp4",
                       {"title": prompt, "comment": SYNTHETIC_LABEL})

    try:
        trainer = Trainer(config, resume=resume, on_step=on_step, on_sample=on_sample)
        bar.n = trainer.step
        final = trainer.run()
    except (BoraModelError, ValueError) as error:
        raise typer.BadParameter(str(error)) from error
    finally:
        bar.close()
    typer.echo(f"wrote {final} (EMA weights, step {trainer.step})")


@app.command("eval")
def eval_command(
    model: Annotated[Path, typer.Option(help="Pipeline folder to evaluate")] = Path("demo/weights/bora-demo"),
    samples_per_domain: Annotated[int, typer.Option(help="Generated videos per domain")] = 16,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON here")] = None,
    grid_dir: Annotated[Path | None, typer.Option(help="Write one PNG grid of samples per domain here")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the first sample (sample i uses seed + i)")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda (default: cuda if available)")] = None,
    sampler: Annotated[str | None, typer.Option(help="iddpm, ddim, dpm-solver++ (default: the model's)")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampling steps (default: the model's)")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale (default: the model's)")] = None,
    broadcast: Annotated[str | None, typer.Option(
        help="Pyramid attention broadcast: 'off' or 'SPATIAL,TEMPORAL,CROSS' (default: the model's)")] = None,
) -> None:
    """Measure a model on the demo's four procedural domains from held-out phrasings (see demo/evaluate.py)."""
    from demo.evaluate import evaluate, train_classifier, write_grids
    from model.attention_broadcast import AttentionBroadcastConfig
    from model.pipeline import BoraPipeline

    typer.echo("training the domain classifier on real procedural clips and noise ...", err=True)
    classifier = train_classifier()
    pipe = BoraPipeline.from_pretrained(model, device=device)
    if broadcast == "off":
        pipe.disable_attention_broadcast()
    elif broadcast is not None:
        try:
            spatial, temporal, cross = (int(n) for n in broadcast.split(","))
        except ValueError:
            raise typer.BadParameter(f"--broadcast {broadcast!r}: expected three integers, e.g. 2,3,5") from None
        pipe.enable_attention_broadcast(AttentionBroadcastConfig(spatial, temporal, cross))

    def progress(done: int, total: int) -> None:
        typer.echo(f"generated {done}/{total}", err=True)

    report, videos = evaluate(pipe, samples_per_domain, seed=seed, classifier=classifier, sampler=sampler,
                              num_inference_steps=steps, guidance_scale=guidance, on_progress=progress)
    typer.echo(report.table())
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=2))
        typer.echo(f"wrote {json_out}")
    if grid_dir is not None:
        for path in write_grids(videos, grid_dir):
            typer.echo(f"wrote {path}")


@app.command("build-demo")
def build_demo_command(
    out: Annotated[Path, typer.Option(help="Where the demo pipeline folder goes")] = Path("demo/weights/bora-demo"),
    work: Annotated[Path, typer.Option(help="Scratch folder: clips, base model, checkpoints")] = Path(
        "data/demo-build"),
    seed: Annotated[int, typer.Option()] = 0,
    steps: Annotated[int | None, typer.Option(help="STDiT steps (default: the recipe's)")] = None,
) -> None:
    """Train the demo model from nothing (procedural clips, VAE, STDiT), seeded; logs progress to stderr."""
    import logging
    import time

    from demo.build import DemoRecipe, build_demo
    from model.training.trainer import StepReport

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()

    def on_step(report: StepReport) -> None:
        if report.step % 20 == 0 or report.step == report.max_steps:
            typer.echo(f"step {report.step}/{report.max_steps} loss {report.loss:.4f} mse {report.mse:.4f} "
                       f"vb {report.vb:.4f} lr {report.lr:.2e} {report.steps_per_s:.2f} it/s "
                       f"elapsed {time.perf_counter() - started:.0f}s", err=True)

    recipe = DemoRecipe(seed=seed) if steps is None else DemoRecipe(seed=seed, steps=steps)
    build_demo(out, work, recipe, on_step=on_step)
    typer.echo(f"wrote {out} in {time.perf_counter() - started:.0f} s")


@app.command()
def serve() -> None:
    """Run the API and one worker on embedded defaults (embedded Redis if none answers), until Ctrl-C."""
    from service.devserver import main

    raise typer.Exit(main())


if __name__ == "__main__":
    main()
