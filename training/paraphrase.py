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

Training may reword captions too (`--shapes_synonym_prob`), with a *second* list of
synonyms and sentence forms, `TRAIN_SYNONYMS` / `TRAIN_TEMPLATES`, that shares no word
with the evaluation's: a model can learn that a fact is carried by more than the
grammar's one word while every word of an evaluation paraphrase stays unseen.
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

# The training side's list: no word in common with SYNONYMS / TEMPLATES (tested).
TRAIN_SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "colour": {
        "red": ("ruby", "rose", "vermilion"),
        "green": ("lime", "mint", "olive"),
        "blue": ("navy", "cerulean", "denim"),
        "yellow": ("canary", "mustard", "sunflower"),
        "purple": ("lavender", "lilac", "mauve"),
        "orange": ("apricot", "pumpkin", "copper"),
    },
    "shape": {
        "circle": ("orb", "sphere", "round"),
        "square": ("cube", "slab", "rectangle"),
        "triangle": ("cone", "spike", "arrowhead"),
    },
    "position": {
        "top left": ("northwest", "high left"),
        "top right": ("northeast", "high right"),
        "bottom left": ("southwest", "low left"),
        "bottom right": ("southeast", "low right"),
        "center": ("midpoint", "heart"),
    },
    "size": {"small": ("mini", "petite", "compact"), "large": ("giant", "massive", "enormous")},
    "background": {
        "white": ("snowy", "cream", "milky"),
        "black": ("jet", "inky", "charcoal"),
        "gray": ("ash", "slate", "smoky"),
    },
}

TRAIN_TEMPLATES = (
    "{colour} {shape} ({size}) located {position}, {background} surroundings",
    "picture of a {size} {shape} in {colour}, placed {position} on {background}",
    "{background} field, {size} {colour} {shape} toward the {position}",
    "{position} - {size} {colour} {shape} upon {background}",
)

_WORD_RE = re.compile(r"\w+|[^\w\s]")


def vocabulary(templates: tuple[str, ...], phrases: list[str]) -> set[str]:
    """Every word and punctuation mark of `templates` (placeholders left out) and `phrases`."""
    words: set[str] = set()
    for text in (*(re.sub(r"\{\w+\}", " ", t) for t in templates), *phrases):
        words |= set(_WORD_RE.findall(text))
    return words


def table_phrases(table: dict[str, dict[str, tuple[str, ...]]]) -> list[str]:
    """Every synonym phrase of a SYNONYMS-shaped table."""
    return [p for by_word in table.values() for ps in by_word.values() for p in ps]


def grammar_vocabulary() -> set[str]:
    """Every word and punctuation mark that any training caption can contain."""
    return vocabulary(S.TEMPLATES,
                      [*S.COLOURS, *S.SHAPES, *S.POSITIONS, *S.SIZES, *S.BACKGROUNDS])


def paraphrase(facts: dict[str, str | None], rng: random.Random) -> str:
    """One paraphrase of `facts` (colour, shape, position, size, background)."""
    words = {k: rng.choice(SYNONYMS[k][str(facts[k])]) for k in SYNONYMS}
    return rng.choice(TEMPLATES).format(**words)


def reword_for_training(facts: dict[str, str | None], rng: random.Random) -> str:
    """A training caption of `facts` in a `TRAIN_TEMPLATES` form, each fact either its
    grammar word or one of its `TRAIN_SYNONYMS` (so both kinds keep being seen)."""
    words = {k: rng.choice((str(facts[k]), *TRAIN_SYNONYMS[k][str(facts[k])]))
             for k in TRAIN_SYNONYMS}
    return rng.choice(TRAIN_TEMPLATES).format(**words)


def paraphrase_prompts(grammar_prompts: list[str], seed: int) -> list[str]:
    """A paraphrase of each grammar prompt, same facts, same order (deterministic)."""
    rng = random.Random(seed)
    return [paraphrase(S.parse_caption(p), rng) for p in grammar_prompts]
