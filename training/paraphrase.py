"""Paraphrases of `shapes` prompts in words the training captions never use.

The question they answer (issue 8): does a prompt still mean something when its words are
new? Every fact of a grammar prompt is restated with a synonym ("crimson", "ball", "upper
left", "big", "grey") inside a reordered sentence, so a caption-trained word tokenizer sees
mostly `<unk>`, while a pretrained encoder sees words it knows. Each paraphrase keeps the
facts of the grammar prompt it was made from, and evaluation gives both the same image
seed, so the two prompt sets are compared pair by pair.

No synonym may ever appear in a training caption (ARCHITECTURE.md, the shapes grammar);
`test_text_encoders.py` checks these tables against the grammar's vocabulary: every
colour, shape, size and background synonym is a new word; a position keeps "left" or
"right" only beside a new word ("upper left", as issue 8 asks).
"""

from __future__ import annotations

import random
import re

from training.datasets import shapes as S

SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "colour": {
        "red": ("crimson", "scarlet", "cherry"),
        "green": ("emerald", "jade"),
        "blue": ("azure", "cobalt", "sapphire"),
        "yellow": ("golden", "lemon"),
        "purple": ("violet", "plum"),
        "orange": ("tangerine", "amber"),
    },
    "shape": {
        "circle": ("ball", "disc", "dot"),
        "square": ("box", "block", "tile"),
        "triangle": ("pyramid", "wedge"),
    },
    "position": {
        "top left": ("upper left", "upper left corner"),
        "top right": ("upper right", "upper right corner"),
        "bottom left": ("lower left", "lower left corner"),
        "bottom right": ("lower right", "lower right corner"),
        "center": ("middle", "centre"),
    },
    "size": {"small": ("tiny", "little"), "large": ("big", "huge")},
    "background": {
        "white": ("ivory", "pale"),
        "black": ("dark", "ebony"),
        "gray": ("grey", "silver"),
    },
}

# Reordered clauses; {position} is a noun phrase ("upper left", "middle").
TEMPLATES = (
    "a {size} {colour} {shape} at the {position} against a {background} backdrop",
    "{position}: one {colour} {shape}, {size}, {background} backdrop",
    "there is a {size} {shape} coloured {colour} at the {position}, over {background}",
    "{background} backdrop with a {size} {colour} {shape} at the {position}",
)

_WORD_RE = re.compile(r"\w+|[^\w\s]")


def grammar_vocabulary() -> set[str]:
    """Every word and punctuation mark that any training caption can contain."""
    words: set[str] = set()
    for template in S.TEMPLATES:
        words |= set(_WORD_RE.findall(re.sub(r"\{\w+\}", " ", template)))
    for values in (S.COLOURS, S.SHAPES, S.POSITIONS, S.SIZES, S.BACKGROUNDS):
        for v in values:
            words |= set(_WORD_RE.findall(v))
    return words


def paraphrase(facts: dict[str, str | None], rng: random.Random) -> str:
    """One paraphrase of `facts` (colour, shape, position, size, background)."""
    words = {k: rng.choice(SYNONYMS[k][str(facts[k])]) for k in SYNONYMS}
    return rng.choice(TEMPLATES).format(**words)


def paraphrase_prompts(grammar_prompts: list[str], seed: int) -> list[str]:
    """A paraphrase of each grammar prompt, same facts, same order (deterministic)."""
    rng = random.Random(seed)
    return [paraphrase(S.parse_caption(p), rng) for p in grammar_prompts]
