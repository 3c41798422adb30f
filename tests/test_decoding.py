"""The stop-string rules every generation path shares (tg_tinker.decoding), on a byte-level tokenizer."""

from __future__ import annotations

import pytest

from tg_tinker.decoding import cut_at_stop, ids_within


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model), local_files_only=True)


def test_ids_within_keeps_tokens_past_a_split_character(tokenizer) -> None:
    ids = tokenizer("naïve café ok", add_special_tokens=False).input_ids
    text = tokenizer.decode(ids, skip_special_tokens=True)
    # The byte-level tokenizer splits ï and é over two tokens each: a prefix ending between them does not
    # decode to a prefix of the text, yet the tokens after it belong to the text.
    assert any("\ufffd" in tokenizer.decode(ids[:n]) for n in range(1, len(ids)))
    assert ids_within(tokenizer, ids, text) == ids
    cut = cut_at_stop(text, [" ok"])
    assert cut == "naïve café"
    kept = ids_within(tokenizer, ids, cut)
    assert tokenizer.decode(kept) == "naïve café" and kept == ids[:len(kept)]


def test_cut_at_stop_takes_the_earliest_stop() -> None:
    assert cut_at_stop("one two three", ["three", "two"]) == "one "
    assert cut_at_stop("one two", ["four"]) is None
