"""Incremental detokenisation and stop strings, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from model_io.output_processor import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from model_io.model_files import resolve_model
    from model_io.tokenizer import Tokenizer

    return Tokenizer(resolve_model(None).path)


TEXTS = [
    "Hello, world! This is PagedFleet.",
    "naïve café — Zürich 東京 🚀 done",
    "  leading spaces and\nnew lines\n\n  indented",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(tokenizer, text):
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    streamed = "".join(detok.add_tokens([t]).text for t in ids) + detok.add_tokens([], finished=True).text
    assert streamed == tokenizer.decode(ids)
    assert "\ufffd" not in streamed


def test_stop_string_cuts_exactly_and_is_never_streamed(tokenizer):
    text = "The answer is 42. STOP here and never show this."
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [1], stop=["STOP"])
    pieces = []
    for t in ids:
        d = detok.add_tokens([t])
        pieces.append(d.text)
        if d.stop_string:
            break
    assert "".join(pieces) == "The answer is 42. "
    assert detok.stopped == "STOP"
    # further tokens change nothing
    assert detok.add_tokens(ids[:3]).text == ""


def test_stop_string_spanning_tokens_and_earliest_wins(tokenizer):
    text = "alpha beta gamma delta"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [1], stop=["delta", "ta gam"])
    d = detok.add_tokens(ids)
    assert d.text == "alpha be" and d.stop_string == "ta gam"


def test_chat_template_renders_like_transformers(tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer.path))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert tokenizer.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tokenizer.encode("Hello world, 123!") == hf("Hello world, 123!")["input_ids"]
