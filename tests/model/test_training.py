"""`bora train`'s parts on the tiny pipeline and a handful of real MP4 clips: data, objective, EMA, the loop,
checkpoints and resume."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from demo.clips import write_mp4
from demo.procedural import DOMAINS, render, sample_attributes
from model.errors import CheckpointError, DatasetError
from model.pipeline import BoraPipeline
from model.training.dataset import VideoTextDataset, read_csv
from model.training.ema import make_ema, update_ema
from model.training.objective import DiffusionObjective, epsilon_from_v
from model.training.trainer import STATE_FILE, TrainConfig, Trainer

FRAMES, SIZE = 6, 32


@pytest.fixture(scope="module")
def clips_csv(tmp_path_factory):
    """Four 6-frame 32×32 procedural clips as MP4 + an upstream-format CSV (paths relative to its folder)."""
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    rows = []
    for i, domain in enumerate(DOMAINS):
        attrs = sample_attributes(domain, rng)
        write_mp4(render(domain, attrs, rng, FRAMES, SIZE), folder / f"{i}.mp4")
        rows.append([f"{i}.mp4", f"a {domain} video, {attrs['speed']}"])
    with open(folder / "train.csv", "w", newline="") as stream:
        csv.writer(stream).writerows(rows)
    return folder / "train.csv"


def config(clips_csv, pipeline, out, **overrides) -> TrainConfig:
    values = dict(data=str(clips_csv), pipeline=str(pipeline), out=str(out), num_frames=4, frame_interval=1,
                  height=SIZE, width=SIZE, batch_size=2, lr=1e-3, max_steps=3, seed=5, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


# -- data ---------------------------------------------------------------------------------------------


def test_dataset_reads_windows_flips_and_crops(clips_csv):
    dataset = VideoTextDataset(clips_csv, None, num_frames=3, frame_interval=2, height=16, width=24)
    assert len(dataset) == 4 and dataset.captions()[0].startswith("a cell video")
    start, flip = dataset.window(0, np.random.default_rng(0))
    assert 0 <= start <= FRAMES - 5
    clip = dataset.load(0, 0, False)
    assert clip.shape == (3, 16, 24, 3) and clip.dtype == torch.uint8  # resized to cover 16×24, then cropped
    same_size = VideoTextDataset(clips_csv, None, num_frames=3, frame_interval=2, height=SIZE, width=SIZE)
    assert torch.equal(same_size.load(0, 0, True), same_size.load(0, 0, False).flip(2))


@pytest.mark.parametrize("row, message", [
    ("just-a-path.mp4", "row 2: expected 'video path,caption'"),
    ("missing.mp4,a caption", "row 2: video .*missing.mp4 does not exist"),
    ("0.mp4,", "row 2: expected"),
])
def test_bad_rows_name_their_row(tmp_path, clips_csv, row, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{clips_csv.parent / '0.mp4'},fine\n{row}\n")
    with pytest.raises(DatasetError, match=message):
        read_csv(bad)


def test_unreadable_and_short_videos_fail_with_their_row(tmp_path, clips_csv):
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    bad = tmp_path / "bad.csv"
    bad.write_text(f"broken.mp4,a caption\n{clips_csv.parent / '0.mp4'},another\n")
    dataset = VideoTextDataset(bad, None, num_frames=4, frame_interval=1, height=SIZE, width=SIZE)
    with pytest.raises(DatasetError, match="row 1: cannot read video"):
        dataset.load(0, 0, False)
    long = VideoTextDataset(bad, None, num_frames=4, frame_interval=3, height=SIZE, width=SIZE)
    with pytest.raises(DatasetError, match="row 2: .* has 6 frames; 4 frames every 3 need 10"):
        long.window(1, np.random.default_rng(0))


# -- objective, EMA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_a_perfect_model_has_zero_loss(prediction):
    """The MSE target and the VLB term: exact predictions with the posterior variance cost nothing (t > 0)."""
    objective = DiffusionObjective(prediction)
    x0 = torch.randn(3, 4, 2, 4, 4)

    def perfect(x_t, t, y, mask):
        # recover ε from x_t using the x0 the test knows, then express it as the objective's target
        noise = (x_t - objective._at("sqrt_ac", t, x0) * x0) / objective._at("sqrt_1m_ac", t, x0)
        return torch.cat([objective.target(x0, t, noise), -torch.ones_like(x0)], dim=1)

    generator = torch.Generator().manual_seed(3)
    terms = objective.loss(perfect, x0, None, None, generator)
    keep = terms["t"] > 0
    assert keep.any()
    assert torch.allclose(terms["loss"][keep], torch.zeros(int(keep.sum())), atol=1e-4)


def test_v_converts_back_to_epsilon():
    objective = DiffusionObjective("v")
    x0, noise = torch.randn(4, 4, 2, 4, 4), torch.randn(4, 4, 2, 4, 4)
    t = torch.tensor([0, 10, 500, 999])
    x_t = objective.q_sample(x0, t, noise)
    assert torch.allclose(epsilon_from_v(objective.target(x0, t, noise), x_t, t), noise, atol=1e-4)
    assert torch.allclose(objective.predict_xstart(x_t, t, objective.target(x0, t, noise)), x0, atol=1e-4)


def test_unknown_prediction_is_refused():
    with pytest.raises(ValueError, match="prediction='x0'"):
        DiffusionObjective("x0")


def test_ema_moves_by_one_minus_decay():
    model = torch.nn.Linear(2, 2)
    ema = make_ema(model)
    before = ema.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    update_ema(ema, model, decay=0.9)
    assert torch.allclose(ema.weight, before + 0.1)
    assert not ema.weight.requires_grad


# -- the loop -----------------------------------------------------------------------------------------


def fixed_batch_loss(trainer: Trainer, batch) -> float:
    trainer.model.eval()  # no caption dropout
    with torch.no_grad():
        loss = trainer.objective.loss(trainer.model, *batch, torch.Generator().manual_seed(0))["loss"].mean()
    trainer.model.train()
    return loss.item()


def test_loss_falls_on_a_fixed_batch(tmp_path, clips_csv, tiny_model_dir):
    trainer = Trainer(config(clips_csv, tiny_model_dir, tmp_path / "out", max_steps=12))
    batch = trainer.batch(0)
    before = fixed_batch_loss(trainer, batch)
    for _ in range(12):
        trainer.train_step()
    assert fixed_batch_loss(trainer, batch) < 0.8 * before


def test_lr_warms_up_holds_then_decays_towards_zero(tmp_path, clips_csv, tiny_model_dir):
    rates: list[float] = []
    Trainer(config(clips_csv, tiny_model_dir, tmp_path / "out", lr=1e-3, warmup_steps=2, decay_steps=3, max_steps=7),
            on_step=lambda r: rates.append(r.lr)).run()
    assert rates == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 2e-3 / 3, 1e-3 / 3])


def test_resume_continues_exactly(tmp_path, clips_csv, tiny_model_dir):
    losses_a: list[float] = []
    run_a = Trainer(config(clips_csv, tiny_model_dir, tmp_path / "a", checkpoint_every=2),
                    on_step=lambda r: losses_a.append(r.loss))
    run_a.run()
    checkpoint = tmp_path / "a" / "checkpoints" / "step-000002"
    assert (checkpoint / STATE_FILE).is_file() and (checkpoint / "model_index.json").is_file()

    losses_b: list[float] = []
    run_b = Trainer(config(clips_csv, tiny_model_dir, tmp_path / "b"), resume=checkpoint,
                    on_step=lambda r: losses_b.append(r.loss))
    assert run_b.step == 2
    run_b.run()
    assert losses_b == [losses_a[2]]
    weights_a = load_file(tmp_path / "a" / "transformer" / "diffusion_pytorch_model.safetensors")
    weights_b = load_file(tmp_path / "b" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_resume_refuses_another_objective(tmp_path, clips_csv, tiny_model_dir):
    Trainer(config(clips_csv, tiny_model_dir, tmp_path / "a", max_steps=1)).run()
    with pytest.raises(CheckpointError, match="prediction='epsilon'"):
        Trainer(config(clips_csv, tiny_model_dir, tmp_path / "b", prediction="v"),
                resume=tmp_path / "a" / "checkpoints" / "step-000001")


def test_output_is_a_pipeline_folder_with_the_ema_weights(tmp_path, clips_csv, tiny_model_dir):
    trainer = Trainer(config(clips_csv, tiny_model_dir, tmp_path / "out", max_steps=2, prediction="v",
                             ema_decay=0.5))
    out = trainer.run()
    pipe = BoraPipeline.from_pretrained(out, device="cpu")
    assert pipe.prediction_type == "v"
    assert (pipe.defaults.num_frames, pipe.defaults.height, pipe.defaults.width) == (4, SIZE, SIZE)
    saved = pipe.transformer.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in trainer.ema.state_dict().items())
    assert not all(torch.equal(saved[k], v) for k, v in trainer.model.state_dict().items())
    video = pipe("a cell video", seed=1, num_inference_steps=2).frames
    assert video.shape == (1, 4, SIZE, SIZE, 3)
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v"


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, clips_csv, tiny_model_dir):
    grads = []
    for checkpointing in (False, True):
        trainer = Trainer(config(clips_csv, tiny_model_dir, tmp_path / str(checkpointing),
                                 grad_checkpointing=checkpointing))
        x0, y, mask = trainer.batch(0)
        torch.manual_seed(0)
        loss = trainer.objective.loss(trainer.model, x0, y, mask, torch.Generator().manual_seed(0))["loss"].mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
