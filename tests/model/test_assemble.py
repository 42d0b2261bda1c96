"""`assemble_bora` on small stand-ins of the three downloads users have, laid out as the real ones are.

- `t5-v1_1-xxl/`: config.json of a T5ForConditionalGeneration (decoder included), its state dict saved with
  `torch.save` as pytorch_model.bin (old HF repos; also sharded + index, and safetensors), a sentencepiece
  `spiece.model` trained here, tokenizer_config.json / special_tokens_map.json as HF writes them.
- `sd-vae-ft-ema/`: config.json + diffusion_pytorch_model.safetensors (or .bin).
- Bora's `ema.pt`: a plain STDiT state dict.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

from model.errors import CheckpointError
from model.pipeline import BoraPipeline
from model.presets import TINY_STDIT, TINY_T5_DIM, assemble_bora
from model.stdit import STDiT
from model.text_encoder import load_tokenizer
from model.tiny import TINY_CORPUS, build_tiny_vae

PROMPTS_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "prompts"
EXTRA_IDS = 100
TRICKY = ["  two  spaces ", "Ünïcödé café — “quotes”", "tab\there", "ﬁ ligature ① ½", "a\nb", "", "MRI, 40%!"]


def _prompts() -> list[str]:
    lines = [line for f in sorted(PROMPTS_DIR.rglob("*.txt")) for line in f.read_text().splitlines()]
    assert lines, f"no prompts under {PROMPTS_DIR}"
    return lines + TRICKY


def write_t5_folder(folder: Path, d_model: int = TINY_T5_DIM, weights: str = "bin", seed: int = 0):
    """A t5-v1_1-xxl look-alike; returns the T5ForConditionalGeneration whose weights it holds."""
    folder.mkdir(parents=True)
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_CORPUS), model_writer=model_file, vocab_size=40, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model_file.getvalue())
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "additional_special_tokens": extra}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    # As in google/t5-v1_1-xxl: no tokenizer_class (AutoTokenizer alone cannot load such a folder).
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**specials, "extra_ids": EXTRA_IDS, "model_max_length": 512, "name_or_path": "google/t5-v1_1-xxl"}))

    config = T5Config(
        vocab_size=40 + EXTRA_IDS, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, architectures=["T5ForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).eval()
    config.save_pretrained(folder)
    state_dict = model.state_dict()
    if weights == "bin":
        torch.save(state_dict, folder / "pytorch_model.bin")
    elif weights == "sharded":
        keys = sorted(state_dict)
        shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        for name, shard_keys in shards.items():
            torch.save({k: state_dict[k] for k in shard_keys}, folder / name)
        weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:  # safetensors wants tied tensors stored once
        save_file({k: v.clone().contiguous() for k, v in state_dict.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    return model


def write_vae_folder(folder: Path, weights: str = "safetensors") -> None:
    build_tiny_vae(folder)
    if weights == "bin":
        file = folder / "diffusion_pytorch_model.safetensors"
        torch.save(load_file(file), folder / "diffusion_pytorch_model.bin")
        file.unlink()


def write_checkpoint(path: Path, drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state_dict = {k: v for k, v in STDiT(**TINY_STDIT).state_dict().items() if k not in drop}
    torch.save(state_dict, path)
    return state_dict


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("downloads")
    t5 = write_t5_folder(root / "t5-v1_1-xxl")
    write_vae_folder(root / "sd-vae-ft-ema")
    write_checkpoint(root / "ema.pt")
    return {"root": root, "t5": root / "t5-v1_1-xxl", "vae": root / "sd-vae-ft-ema", "ckpt": root / "ema.pt",
            "t5_model": t5}


@pytest.fixture(scope="module")
def assembled(downloads, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "bora"
    assert assemble_bora(downloads["ckpt"], downloads["vae"], downloads["t5"], out, stdit_config=TINY_STDIT) == out
    return out


def test_assembled_folder_loads_and_generates(assembled):
    pipe = BoraPipeline.from_pretrained(assembled, device="cpu")
    assert pipe.name == "bora"
    out = pipe("an mri of the knee, sagittal", seed=0, num_frames=4, height=32, width=32, num_inference_steps=2)
    assert out.frames.shape == (1, 4, 32, 32, 3) and out.frames.dtype == np.uint8
    assert out.token_counts[0] > 1 and out.truncated == [False]


def test_text_encoder_is_the_downloaded_encoder_without_decoder(assembled, downloads):
    keys = set(load_file(assembled / "text_encoder" / "model.safetensors"))
    assert keys and not [k for k in keys if k.startswith(("decoder.", "lm_head."))]
    pipe = BoraPipeline.from_pretrained(assembled, device="cpu")
    ids = torch.tensor([[16, 29, 5, 1]])
    with torch.no_grad():
        expected = downloads["t5_model"].encoder(input_ids=ids).last_hidden_state
        got = pipe.text_encoder.t5(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected)


def test_saved_tokenizer_is_fast_form_and_matches_sentencepiece(assembled, downloads):
    folder = assembled / "tokenizer"
    assert (folder / "tokenizer.json").is_file() and not (folder / "spiece.model").exists()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(downloads["t5"] / "spiece.model"))
    assert len(tokenizer) == sp.get_piece_size() + EXTRA_IDS
    for text in _prompts():
        assert tokenizer(text)["input_ids"] == sp.encode(text) + [sp.eos_id()], text
    # T5's sentinels come last, <extra_id_0> at the very end
    assert tokenizer.convert_tokens_to_ids(["<extra_id_99>", "<extra_id_0>"]) == [40, 40 + EXTRA_IDS - 1]


def test_load_tokenizer_refuses_a_conversion_that_lost_the_vocabulary(downloads, monkeypatch):
    from transformers import T5Tokenizer  # T5TokenizerFast is the same class in transformers 5

    # T5Tokenizer(vocab_file=...) ignores the file and builds a 4-token vocabulary without a warning
    monkeypatch.setattr(T5Tokenizer, "from_pretrained",
                        classmethod(lambda cls, d, **kw: cls(vocab_file=str(Path(d) / "spiece.model"))))
    with pytest.raises(CheckpointError, match="pieces in order"):
        load_tokenizer(downloads["t5"])


@pytest.mark.parametrize("t5_weights, vae_weights", [("sharded", "bin"), ("safetensors", "safetensors")])
def test_other_download_layouts(tmp_path, downloads, t5_weights, vae_weights):
    t5 = write_t5_folder(tmp_path / "t5", weights=t5_weights, seed=1)
    write_vae_folder(tmp_path / "vae", weights=vae_weights)
    assemble_bora(downloads["ckpt"], tmp_path / "vae", tmp_path / "t5", tmp_path / "out", stdit_config=TINY_STDIT)
    pipe = BoraPipeline.from_pretrained(tmp_path / "out", device="cpu")
    ids = torch.tensor([[7, 8, 1]])
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder.t5(input_ids=ids).last_hidden_state,
                                   t5.encoder(input_ids=ids).last_hidden_state)


def _copy(downloads: dict, tmp_path: Path) -> dict:
    parts = {name: tmp_path / downloads[name].name for name in ("t5", "vae", "ckpt")}
    for name, target in parts.items():
        (shutil.copytree if downloads[name].is_dir() else shutil.copy)(downloads[name], target)
    return parts


def _wrong_d_model(parts):
    shutil.rmtree(parts["t5"])
    write_t5_folder(parts["t5"], d_model=48)


def _wrong_latent_channels(parts):
    shutil.rmtree(parts["vae"])
    AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=8, norm_num_groups=4,
                  ).save_pretrained(parts["vae"])


def _drop_t5_weight(parts):
    state_dict = torch.load(parts["t5"] / "pytorch_model.bin", weights_only=True)
    del state_dict["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    torch.save(state_dict, parts["t5"] / "pytorch_model.bin")


def _drop_vae_weight(parts):
    file = parts["vae"] / "diffusion_pytorch_model.safetensors"
    state_dict = load_file(file)
    del state_dict["decoder.conv_out.weight"]
    save_file(state_dict, file)


@pytest.mark.parametrize("break_it, message", [
    (_wrong_d_model, "d_model=48 .*caption_channels=32"),
    (_wrong_latent_channels, "latent_channels=8"),
    (lambda p: write_checkpoint(p["ckpt"], drop=("final_layer.linear.weight", "blocks.1.attn.qkv.weight")),
     "2 missing: blocks.1.attn.qkv.weight, final_layer.linear.weight"),
    (lambda p: shutil.rmtree(p["vae"]), "VAE folder .* does not exist"),
    (lambda p: (p["t5"] / "config.json").unlink(), "T5 folder .* has no config.json"),
    (lambda p: (p["t5"] / "spiece.model").unlink(), "neither tokenizer.json nor spiece.model"),
    (lambda p: (p["t5"] / "pytorch_model.bin").unlink(), "T5 encoder folder .* cannot load its weights"),
    (_drop_t5_weight, "1 weights missing .*encoder.block.1.layer.1.DenseReluDense.wo.weight"),
    (_drop_vae_weight, "VAE folder .*1 weights missing .*decoder.conv_out.weight"),
])
def test_wrong_parts_are_refused_before_anything_is_written(tmp_path, downloads, break_it, message):
    parts = _copy(downloads, tmp_path)
    break_it(parts)
    with pytest.raises(CheckpointError, match=message):
        assemble_bora(parts["ckpt"], parts["vae"], parts["t5"], tmp_path / "out", stdit_config=TINY_STDIT)
    assert not (tmp_path / "out").exists()
