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
                      guidance_scale=guidance_scale, sampler=sampler, seed=seed, callback_on_step_end=on_step)
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
def serve() -> None:
    """Run the API and one worker on embedded defaults (embedded Redis if none answers), until Ctrl-C."""
    from service.devserver import main

    raise typer.Exit(main())


if __name__ == "__main__":
    main()
