"""`bora submit "prompt" --wait --out video.mp4`: submit a job to a running service with this client.

Also `python -m bora_client submit ...` and the `bora-client` command. The service is `--base-url` (default
$BORA_BASE_URL, else http://127.0.0.1:8000); the API key is read from $BORA_API_KEY only, so it never
shows in a process list or shell history. Exit status: 0 succeeded (or submitted, without --wait), 1 the job
failed or was canceled or the API refused, 2 bad arguments, 130 interrupted (the job keeps running).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bora_client.client import Client
from bora_client.errors import BoraError
from bora_client.models import VARIANTS


def submit_parser(prog: str = "bora submit") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Submit a text-to-video job to a Bora service.")
    parser.add_argument("prompt", help="what the video shows")
    parser.add_argument("--wait", action="store_true", help="wait until the job ends (live progress on stderr)")
    parser.add_argument("--out", "-o", type=Path, help="download the result here (implies --wait)")
    parser.add_argument("--variant", choices=VARIANTS, default="video", help="what --out downloads")
    parser.add_argument("--frames", type=int, dest="num_frames")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--fps", type=int)
    parser.add_argument("--steps", type=int, dest="num_inference_steps")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--sampler", choices=("iddpm", "ddim", "dpm-solver++"))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                        help="client reference echoed back (repeatable)")
    parser.add_argument("--base-url", help="the service (default $BORA_BASE_URL or http://127.0.0.1:8000)")
    parser.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while waiting")
    parser.add_argument("--json", action="store_true", help="print the job object as JSON")
    return parser


def submit_main(argv: Sequence[str] | None = None, prog: str = "bora submit") -> int:
    args = submit_parser(prog).parse_args(argv)
    metadata = {}
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"{prog}: --metadata takes KEY=VALUE, not {item!r}", file=sys.stderr)
            return 2
        metadata[key] = value
    try:
        with Client(args.base_url) as client:
            job = client.create(
                args.prompt, num_frames=args.num_frames, height=args.height, width=args.width, fps=args.fps,
                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                sampler=args.sampler, seed=args.seed, metadata=metadata or None,
            )
            print(f"submitted {job.id} (seed {job.seed})", file=sys.stderr)
            for warning in job.warnings:
                print(f"warning: {warning.message}", file=sys.stderr)
            if args.wait or args.out:
                try:
                    job = client.wait(job, progress=not args.no_progress, timeout=args.timeout)
                except KeyboardInterrupt:
                    print(f"\nstopped waiting; {job.id} keeps running (cancel: POST /v1/videos/{job.id}/cancel)",
                          file=sys.stderr)
                    return 130
            if job.status in ("failed", "canceled"):
                reason = f": {job.error.code}: {job.error.message}" if job.error else ""
                print(f"{job.id} {job.status}{reason}", file=sys.stderr)
                _print_job(job, args.json)
                return 1
            if args.out:
                path = client.download(job, args.out, variant=args.variant)
                print(f"wrote {path} (sha256 checked)", file=sys.stderr)
    except BoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print_job(job, args.json)
    return 0


def _print_job(job: object, as_json: bool) -> None:
    from bora_client.models import Job

    assert isinstance(job, Job)
    print(job.model_dump_json(indent=2) if as_json else f"{job.id} {job.status}")


def main(argv: Sequence[str] | None = None) -> int:
    """`bora-client submit ...` (one subcommand today; the `bora` CLI mounts the same as `bora submit`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "submit":
        print("usage: bora-client submit PROMPT [--wait] [--out FILE] [...]  (bora-client submit --help)",
              file=sys.stderr)
        return 2
    return submit_main(argv[1:], prog="bora-client submit")


if __name__ == "__main__":
    sys.exit(main())
