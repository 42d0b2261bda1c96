"""Caption cleaning must reproduce upstream's T5Embedder.text_preprocessing string for string."""

from __future__ import annotations

import json

import pytest

from model.text_preprocessing import clean_caption, text_preprocessing


@pytest.fixture(scope="module")
def pairs(reference_dir) -> list[dict]:
    data = json.loads((reference_dir / "text_preprocessing.json").read_text(encoding="utf-8"))
    assert len(data["pairs"]) == 167
    return data["pairs"]


def test_one_pass_matches_upstream_on_every_reference_pair(pairs):
    wrong = [(p["input"], clean_caption(p["input"]), p["clean_caption_once"]) for p in pairs]
    wrong = [w for w in wrong if w[1] != w[2]]
    assert not wrong, f"{len(wrong)}/{len(pairs)} differ, first: {wrong[0]!r}"


def test_text_preprocessing_cleans_twice_like_upstream(pairs):
    wrong = [(p["input"], text_preprocessing(p["input"]), p["output"]) for p in pairs]
    wrong = [w for w in wrong if w[1] != w[2]]
    assert not wrong, f"{len(wrong)}/{len(pairs)} differ, first: {wrong[0]!r}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A close-up of the well-lit colon", "a close-up of the well-lit colon"),
        (
            "a close-up, well-lit, high-res, t2-weighted view",
            "a close up, well lit, high res, t2 weighted view",
        ),
        ("Sagittal MRI of the knee (knee cap)", "sagittal mri of the knee knee cap"),
        ("The patient’s heart", "the patient's heart"),
    ],
)
def test_documented_quirks(text, expected):
    assert text_preprocessing(text) == expected


def test_filename_or_url_like_input_raises_no_bs4_warning(recwarn):
    assert clean_caption("hello.txt") == "hello. txt"
    assert clean_caption("/path/to/file") == "path to file"
    assert not [w for w in recwarn if "bs4" in type(w.message).__module__]
