"""`bora eval`: how well a pipeline folder draws the four procedural domains from held-out phrasings.

1. A domain classifier (scikit-learn logistic regression on `demo.features`) is trained on fresh real
   procedural clips plus a "none" class of noise and corrupted clips, and checked on other real clips and on
   pure noise before it judges anything.
2. The model generates `samples_per_domain` videos per domain from the held-out caption template, with
   attributes drawn from a fixed seed.
3. Figures: domain accuracy (overall, per domain; "none" counts as wrong), temporal energy of generated vs
   real clips, Fréchet distance between generated and real feature distributions (with the distance between
   two real sets of the same size as a floor), colour adherence where the caption names a colour, and
   whether the same seed gives the same video.

None of this is tuned to the model under test: the classifier and references come only from real
procedural clips and noise, with fixed seeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from demo.captions import HELD_OUT, caption
from demo.clips import make_clips
from demo.features import dominant_colour, features, frechet_distance, temporal_energy
from demo.procedural import DOMAINS, NUM_FRAMES, SIZE, sample_attributes

NONE = "none"
CLASSES = (*DOMAINS, NONE)
CLASSIFIER_SEED, CHECK_SEED, PROMPT_SEED, FRECHET_SEED = 1001, 1002, 1003, 1004


# ---------------------------------------------------------------------------------------------------
# "none": noise and corrupted clips
# ---------------------------------------------------------------------------------------------------

def pure_noise(rng: np.random.Generator, frames: int = NUM_FRAMES, size: int = SIZE) -> np.ndarray:
    """Uniform or Gaussian pixel noise, independent per frame."""
    if rng.random() < 0.5:
        return rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    mean, std = rng.uniform(40, 215, 3), rng.uniform(10, 80)
    return np.clip(rng.normal(mean, std, (frames, size, size, 3)), 0, 255).astype(np.uint8)


def smooth_noise(rng: np.random.Generator, frames: int = NUM_FRAMES, size: int = SIZE) -> np.ndarray:
    """Blurry coloured blobs (low-resolution noise upsampled), flickering or still: an untrained model's look."""
    cells = int(rng.choice([2, 4, 8]))
    still = rng.random() < 0.4
    low = rng.uniform(0, 1, (1 if still else frames, cells, cells, 3))
    clip = np.repeat(np.repeat(low, size // cells, 1), size // cells, 2)
    clip = np.broadcast_to(clip, (frames, size, size, 3))
    return (np.clip(clip + rng.normal(0, 0.05, clip.shape), 0, 1) * 255).astype(np.uint8)


def corrupt(clip: np.ndarray, rng: np.random.Generator, others: list[np.ndarray]) -> np.ndarray:
    """A real clip made unrecognisable: blocks shuffled, drowned in noise, or frames of different clips mixed."""
    kind = rng.integers(3)
    frames, size = clip.shape[0], clip.shape[1]
    if kind == 0:
        block = 16
        n = size // block
        blocks = clip.reshape(frames, n, block, n, block, 3).transpose(1, 3, 0, 2, 4, 5).reshape(n * n, frames,
                                                                                                  block, block, 3)
        blocks = blocks[rng.permutation(n * n)].reshape(n, n, frames, block, block, 3)
        return np.ascontiguousarray(blocks.transpose(2, 0, 3, 1, 4, 5).reshape(clip.shape))
    if kind == 1:
        alpha = rng.uniform(0.1, 0.35)
        return (alpha * clip + (1 - alpha) * pure_noise(rng, frames, size)).astype(np.uint8)
    picks = rng.integers(0, len(others), frames)
    return np.stack([others[p][t] for t, p in enumerate(picks)])


def none_clips(n: int, rng: np.random.Generator, real: list[np.ndarray]) -> list[np.ndarray]:
    makers = [lambda: pure_noise(rng), lambda: smooth_noise(rng),
              lambda: corrupt(real[rng.integers(len(real))], rng, real)]
    return [makers[i % 3]() for i in range(n)]


def _blur(clip: np.ndarray) -> np.ndarray:
    """3-tap box blur in space: the classifier must know a domain by its content, not by its sharpness."""
    x = clip.astype(np.float32)
    x = (x + np.roll(x, 1, 1) + np.roll(x, -1, 1)) / 3
    x = (x + np.roll(x, 1, 2) + np.roll(x, -1, 2)) / 3
    return x.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------------

@dataclass
class DomainClassifier:
    model: object
    real_accuracy: float  # on held-out real clips
    noise_as_domain: float  # share of pure-noise clips called some domain

    def predict(self, clips) -> list[str]:
        return [CLASSES[i] for i in self.model.predict(features(clips))]


def train_classifier(per_domain: int = 150, check_per_domain: int = 50) -> DomainClassifier:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(CLASSIFIER_SEED)
    clips = make_clips(per_domain, CLASSIFIER_SEED)
    real = [clip.frames if i % 2 else _blur(clip.frames) for i, clip in enumerate(clips)]
    labels = [CLASSES.index(clip.domain) for clip in clips]
    noise = none_clips(per_domain * 2, rng, [clip.frames for clip in clips])
    x = features(real + noise)
    y = np.array(labels + [CLASSES.index(NONE)] * len(noise))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=5000))
    model.fit(x, y)

    check = make_clips(check_per_domain, CHECK_SEED)
    predicted = model.predict(features([clip.frames for clip in check]))
    real_accuracy = float(np.mean([CLASSES[p] == clip.domain for p, clip in zip(predicted, check, strict=True)]))
    check_rng = np.random.default_rng(CHECK_SEED)
    noise_pred = model.predict(features([pure_noise(check_rng) for _ in range(check_per_domain)]))
    noise_as_domain = float(np.mean([CLASSES[p] != NONE for p in noise_pred]))
    return DomainClassifier(model, real_accuracy, noise_as_domain)


# ---------------------------------------------------------------------------------------------------
# Evaluation of a pipeline
# ---------------------------------------------------------------------------------------------------

@dataclass
class EvalPrompt:
    domain: str
    attrs: dict
    text: str


def eval_prompts(per_domain: int, seed: int = PROMPT_SEED) -> list[EvalPrompt]:
    """`per_domain` held-out-template prompts per domain, attributes from a fixed seed."""
    rng = np.random.default_rng(seed)
    prompts = []
    for domain in DOMAINS:
        for _ in range(per_domain):
            attrs = sample_attributes(domain, rng)
            prompts.append(EvalPrompt(domain, attrs, caption(domain, attrs, HELD_OUT)))
    return prompts


@dataclass
class EvalReport:
    model: str
    samples_per_domain: int
    classifier: dict
    domains: dict = field(default_factory=dict)
    overall: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"model": self.model, "samples_per_domain": self.samples_per_domain, "classifier": self.classifier,
                "domains": self.domains, "overall": self.overall}

    def table(self) -> str:
        lines = [f"model {self.model}: {self.samples_per_domain} samples per domain, held-out phrasings",
                 f"classifier: {self.classifier['real_accuracy']:.1%} on held-out real clips, "
                 f"{self.classifier['noise_as_domain']:.1%} of pure noise called a domain",
                 f"{'domain':<11} {'accuracy':>8} {'none':>6} {'energy gen':>10} {'energy real':>11} "
                 f"{'ratio':>6} {'colour':>7} {'FD':>8} {'FD real':>8}"]
        for domain, row in self.domains.items():
            colour = "-" if row["colour_adherence"] is None else f"{row['colour_adherence']:.0%}"
            lines.append(f"{domain:<11} {row['accuracy']:>8.1%} {row['none_rate']:>6.1%} "
                         f"{row['temporal_energy']:>10.4f} {row['temporal_energy_real']:>11.4f} "
                         f"{row['energy_ratio']:>6.2f} {colour:>7} {row['frechet']:>8.1f} "
                         f"{row['frechet_real']:>8.1f}")
        o = self.overall
        lines.append(f"{'overall':<11} {o['accuracy']:>8.1%} {o['none_rate']:>6.1%} {'':>10} {'':>11} {'':>6} "
                     f"{'':>7} {o['frechet']:>8.1f} {o['frechet_real']:>8.1f}")
        lines.append(f"real clips through the model's VAE and back: {o['vae_roundtrip_accuracy']:.1%} classified right")
        lines.append(f"same seed, same video: {o['deterministic']}; {o['seconds_per_sample']:.2f} s per sample")
        return "\n".join(lines)


def _frechet_pca(real_features: np.ndarray, dims: int = 16):
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), PCA(dims, random_state=0)).fit(real_features)


def evaluate(pipe, samples_per_domain: int = 16, batch_size: int = 8, seed: int = 0,
             classifier: DomainClassifier | None = None, reference_per_domain: int = 64,
             sampler: str | None = None, num_inference_steps: int | None = None,
             guidance_scale: float | None = None, on_progress=None) -> tuple[EvalReport, dict]:
    """Generate from held-out prompts with `pipe` (its default sampler, steps and guidance unless given) and
    measure; returns the report and the videos by domain."""
    classifier = classifier or train_classifier()
    generation = dict(sampler=sampler, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    prompts = eval_prompts(samples_per_domain)
    videos: list[np.ndarray] = []
    started = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        out = pipe([p.text for p in batch], seed=[seed + i + j for j in range(len(batch))], **generation)
        videos.extend(out.frames)
        if on_progress is not None:
            on_progress(len(videos), len(prompts))
    seconds_per_sample = (time.perf_counter() - started) / len(prompts)
    # the same request twice (a batch's numerics depend on its size, so not against the batched run)
    first, again = (pipe(prompts[0].text, seed=seed, **generation).frames[0] for _ in range(2))
    deterministic = bool(np.array_equal(first, again))

    predicted = classifier.predict(videos)
    # the ceiling the VAE sets: real clips of the prompts' domains through the pipeline's VAE and back
    import torch

    real_for_vae = make_clips(samples_per_domain, PROMPT_SEED)
    with torch.no_grad():
        frames = torch.from_numpy(np.stack([c.frames for c in real_for_vae]))
        roundtrip = pipe.vae.decode(pipe.vae.encode(frames.to(pipe.device))).numpy()
    roundtrip_predicted = classifier.predict(list(roundtrip))
    reference = make_clips(reference_per_domain, FRECHET_SEED)  # real clips
    reference_floor = make_clips(samples_per_domain, FRECHET_SEED + 1)  # a real set the size of the generated one
    projection = _frechet_pca(features([c.frames for c in reference]))

    def project(clips):
        return projection.transform(features(clips))

    report = EvalReport(model=pipe.name, samples_per_domain=samples_per_domain, classifier={
        "real_accuracy": classifier.real_accuracy, "noise_as_domain": classifier.noise_as_domain})
    by_domain: dict[str, list[np.ndarray]] = {}
    for domain in DOMAINS:
        index = [k for k, p in enumerate(prompts) if p.domain == domain]
        generated = [videos[k] for k in index]
        by_domain[domain] = generated
        real = [c.frames for c in reference if c.domain == domain]
        floor = [c.frames for c in reference_floor if c.domain == domain]
        colours = [(dominant_colour(videos[k], domain), prompts[k].attrs.get("colour")) for k in index]
        adherence = [got == wanted for got, wanted in colours if wanted is not None]
        energy = float(np.mean([temporal_energy(v) for v in generated]))
        energy_real = float(np.mean([temporal_energy(v) for v in real]))
        report.domains[domain] = {
            "accuracy": float(np.mean([predicted[k] == domain for k in index])),
            "none_rate": float(np.mean([predicted[k] == NONE for k in index])),
            "predicted": {c: int(sum(predicted[k] == c for k in index)) for c in CLASSES},
            "temporal_energy": energy,
            "temporal_energy_real": energy_real,
            "energy_ratio": energy / energy_real,
            "colour_adherence": float(np.mean(adherence)) if adherence else None,
            "frechet": frechet_distance(project(generated), project(real)),
            "frechet_real": frechet_distance(project(floor), project(real)),
        }
    all_real = [c.frames for c in reference]
    report.overall = {
        "accuracy": float(np.mean([predicted[k] == p.domain for k, p in enumerate(prompts)])),
        "none_rate": float(np.mean([p == NONE for p in predicted])),
        "frechet": frechet_distance(project(videos), project(all_real)),
        "frechet_real": frechet_distance(project([c.frames for c in reference_floor]), project(all_real)),
        "vae_roundtrip_accuracy": float(np.mean([p == c.domain for p, c in zip(roundtrip_predicted, real_for_vae,
                                                                                    strict=True)])),
        "deterministic": deterministic,
        "seconds_per_sample": seconds_per_sample,
        "generation": {key: value for key, value in generation.items() if value is not None},
        "prompts": [p.text for p in prompts],
    }
    return report, by_domain


def write_grids(videos_by_domain: dict[str, list[np.ndarray]], folder, rows: int = 4, every: int = 3) -> list:
    """One PNG per domain: `rows` samples, every `every`-th frame across (2× nearest-neighbour upscale)."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for domain, videos in videos_by_domain.items():
        strips = [np.concatenate(list(video[::every]), axis=1) for video in videos[:rows]]  # [H, W*k, 3]
        grid = np.concatenate(strips, axis=0)
        image = Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST)
        path = folder / f"demo-{domain}.png"
        image.save(path)
        paths.append(path)
    return paths
