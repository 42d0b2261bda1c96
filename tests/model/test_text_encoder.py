"""T5TextEncoder on the tiny offline tokenizer + T5: upstream encoding, cache, null embedding, dtypes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, T5EncoderModel

from model.text_encoder import T5TextEncoder
from model.text_preprocessing import text_preprocessing
from model.tiny import build_tiny_t5, build_tiny_tokenizer

D_MODEL = 32
LONG_PROMPT = " ".join(["the endoscope moves slowly through the colon showing pink mucosa"] * 20)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_text")
    build_tiny_tokenizer(root / "tokenizer")
    build_tiny_t5(root / "text_encoder", d_model=D_MODEL, seed=0)
    return root


@pytest.fixture
def encoder(parts) -> T5TextEncoder:
    return T5TextEncoder.from_pretrained(parts / "text_encoder", parts / "tokenizer", device="cpu")


def count_t5_calls(encoder: T5TextEncoder) -> list[int]:
    """Batch sizes of every T5 forward from now on."""
    calls: list[int] = []
    encoder.t5.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return calls


# --- tiny builders ---------------------------------------------------------------------------------


def test_tiny_tokenizer_is_a_t5_tokenizer_and_deterministic(tmp_path, parts):
    tokenizer = AutoTokenizer.from_pretrained(parts / "tokenizer", local_files_only=True)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("an mri of the brain")["input_ids"]
    assert ids[-1] == 1 and 2 not in ids, "ends with </s>, and corpus words need no <unk>"
    build_tiny_tokenizer(tmp_path / "again")
    first = (parts / "tokenizer" / "tokenizer.json").read_bytes()
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == first
    assert len(json.loads(first)["model"]["vocab"]) == len(tokenizer)


def test_tiny_t5_reloads_and_same_seed_gives_same_weights(tmp_path, parts):
    reloaded = T5EncoderModel.from_pretrained(parts / "text_encoder", local_files_only=True)
    assert reloaded.config.d_model == D_MODEL
    assert reloaded.config.vocab_size == len(AutoTokenizer.from_pretrained(parts / "tokenizer"))
    same = build_tiny_t5(tmp_path / "same", d_model=D_MODEL, seed=0)
    other = build_tiny_t5(tmp_path / "other", d_model=D_MODEL, seed=1)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, same.state_dict()[name]), name
    assert not torch.equal(reloaded.shared.weight, other.shared.weight)


def test_building_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_t5(tmp_path / "t5", d_model=D_MODEL, seed=0)
    assert torch.equal(torch.rand(3), expected)


# --- encoding --------------------------------------------------------------------------------------


def test_encode_matches_upstream_t5_embedder(encoder, parts):
    prompts = ["An MRI of the brain, axial slice.", "Cells dividing under a microscope", LONG_PROMPT]
    out = encoder.encode(prompts)
    assert out["y"].shape == (3, 1, 120, D_MODEL) and out["y"].dtype == torch.float32
    assert out["mask"].shape == (3, 120) and out["mask"].dtype == torch.int64

    # upstream T5Embedder.get_text_embeddings, written out
    tokenizer = AutoTokenizer.from_pretrained(parts / "tokenizer")
    t5 = T5EncoderModel.from_pretrained(parts / "text_encoder").eval()
    tokens = tokenizer(
        [text_preprocessing(p) for p in prompts],
        max_length=120,
        padding="max_length",
        truncation=True,
        return_attention_mask=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = t5(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])[
            "last_hidden_state"
        ]
    torch.testing.assert_close(out["y"][:, 0], expected)
    assert torch.equal(out["mask"], tokens["attention_mask"])
    assert tokens["input_ids"][2, -1] == tokenizer.eos_token_id, "a truncated prompt still ends with </s>"


def test_token_counts_and_truncation_flag(encoder):
    (short, long) = encoder.token_counts(["An MRI of the brain", LONG_PROMPT])
    mask = encoder.encode(["An MRI of the brain", LONG_PROMPT])["mask"]
    assert short == (int(mask[0].sum()), False)
    assert long[0] > 120 and long[1] is True and int(mask[1].sum()) == 120
    assert encoder.token_counts("an mri of the brain") == [short], "counts are taken after cleaning"


def test_cache_hits_skip_t5(encoder):
    calls = count_t5_calls(encoder)
    first = encoder.encode(["an mri of the brain", "cells dividing"])
    assert calls == [2]
    again = encoder.encode(["Cells dividing", "AN MRI OF THE BRAIN"])  # same cleaned prompts
    assert calls == [2], "cache keyed on the cleaned prompt; no T5 run"
    assert torch.equal(again["y"], first["y"].flip(0)) and torch.equal(again["mask"], first["mask"].flip(0))
    encoder.encode(["a new prompt", "cells dividing", "a new prompt"])
    assert calls == [2, 1], "only the one missing, de-duplicated prompt runs"


def test_lru_eviction_and_disabled_cache(parts):
    encoder = T5TextEncoder.from_pretrained(parts / "text_encoder", parts / "tokenizer", cache_size=2)
    calls = count_t5_calls(encoder)
    for prompt in ["a", "b", "a", "c"]:  # "b" is the least recently used when "c" arrives
        encoder.encode([prompt])
    assert calls == [1, 1, 1] and encoder.cache_len == 2
    encoder.encode(["a"])
    encoder.encode(["b"])
    assert calls == [1, 1, 1, 1]

    uncached = T5TextEncoder.from_pretrained(parts / "text_encoder", parts / "tokenizer", cache_size=0)
    calls = count_t5_calls(uncached)
    uncached.encode(["a"])
    uncached.encode(["a"])
    assert calls == [1, 1] and uncached.cache_len == 0


def test_results_do_not_alias_the_cache(encoder):
    out = encoder.encode(["an mri of the brain"])
    expected = out["y"].clone()
    out["y"].zero_()
    assert torch.equal(encoder.encode(["an mri of the brain"])["y"], expected)


def test_empty_batch(encoder):
    out = encoder.encode([])
    assert out["y"].shape == (0, 1, 120, D_MODEL) and out["mask"].shape == (0, 120)


# --- null embedding --------------------------------------------------------------------------------


def test_null_repeats_the_stdit_y_embedding(encoder):
    with pytest.raises(RuntimeError, match="set_null"):
        encoder.null(2)
    y_embedding = torch.randn(120, D_MODEL)
    encoder.set_null(y_embedding)
    null = encoder.null(3)
    assert null.shape == (3, 1, 120, D_MODEL)
    assert torch.equal(null, y_embedding[None].repeat(3, 1, 1)[:, None])
    with pytest.raises(ValueError, match=r"\(120, 32\)"):
        encoder.set_null(torch.zeros(8, D_MODEL))


# --- devices and dtypes ----------------------------------------------------------------------------


def test_fp16_t5_is_refused(parts):
    t5 = T5EncoderModel.from_pretrained(parts / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(parts / "tokenizer")
    with pytest.raises(ValueError, match="float16"):
        T5TextEncoder(t5, tokenizer, dtype=torch.float16)
    with pytest.raises(ValueError, match="float16"):
        T5TextEncoder.from_pretrained(parts / "text_encoder", parts / "tokenizer", dtype=torch.float16)


def test_bf16_t5_with_fp16_outputs(parts, encoder):
    bf16 = T5TextEncoder.from_pretrained(
        parts / "text_encoder", parts / "tokenizer", dtype=torch.bfloat16, output_dtype=torch.float16
    )
    assert next(bf16.t5.parameters()).dtype == torch.bfloat16
    out = bf16.encode(["an mri of the brain"])
    assert out["y"].dtype == torch.float16 and out["mask"].dtype == torch.int64
    reference = encoder.encode(["an mri of the brain"])["y"]
    torch.testing.assert_close(out["y"].float(), reference, atol=0.1, rtol=0.05)
    bf16.set_null(torch.zeros(120, D_MODEL))
    assert bf16.null(1).dtype == torch.float16


def test_save_and_reload_round_trip(encoder, tmp_path):
    encoder.save_pretrained(tmp_path / "text_encoder", tmp_path / "tokenizer")
    reloaded = T5TextEncoder.from_pretrained(tmp_path / "text_encoder", tmp_path / "tokenizer")
    prompts = ["an mri of the brain", LONG_PROMPT]
    assert torch.equal(reloaded.encode(prompts)["y"], encoder.encode(prompts)["y"])
    assert reloaded.token_counts(prompts) == encoder.token_counts(prompts)
