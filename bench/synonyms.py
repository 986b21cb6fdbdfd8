"""Which unseen words does a shapes model understand? One synonym at a time, in the grammar.

    python bench/synonyms.py CHECKPOINT [CHECKPOINT ...] [--per-word 24] [--guidance 1.5]

Not a speed benchmark: a probe behind the paraphrase table in docs/models.md. `promptpix
eval --prompts paraphrase` changes every word and the sentence order at once; here each
prompt is the training template ("a large red circle in the top left on a white
background") with exactly one fact restated by one synonym from `training.paraphrase`
("... crimson circle ..."), and only that fact is scored (the dataset's analyser reads it
back from the image). Same prompts and seeds for every checkpoint.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import load_checkpoint  # noqa: E402
from training.datasets import shapes as S  # noqa: E402
from training.paraphrase import SYNONYMS  # noqa: E402


def probe_prompts(per_word: int, seed: int) -> list[tuple[str, str, str, str]]:
    """(fact, grammar word, synonym, prompt) rows: template 0, one fact reworded."""
    rng = random.Random(seed)
    rows = []
    for fact, table in SYNONYMS.items():
        for word, synonyms in table.items():
            for syn in synonyms:
                for _ in range(per_word):
                    facts = {"colour": rng.choice(S.COLOURS), "shape": rng.choice(S.SHAPES),
                             "position": rng.choice(S.POSITIONS), "size": "large",
                             "background": rng.choice(S.BACKGROUNDS)}
                    facts[fact] = word
                    words = {**facts, fact: syn}
                    rows.append((fact, word, syn, S.TEMPLATES[0].format(**words)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--per-word", type=int, default=24, help="prompts per synonym")
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = probe_prompts(args.per_word, args.seed)
    prompts = [r[3] for r in rows]
    scores: dict[str, dict[tuple[str, str, str], float]] = {}
    for ck in args.checkpoints:
        model, _ = load_checkpoint(ck)
        hits: dict[tuple[str, str, str], list[bool]] = {}
        for s in range(0, len(prompts), args.batch_size):
            e = min(len(prompts), s + args.batch_size)
            images = model.generate(prompts[s:e], guidance_scale=args.guidance,
                                    seed=[args.seed + i for i in range(s, e)])
            for (fact, word, syn, _), img in zip(rows[s:e], images, strict=True):
                hits.setdefault((fact, word, syn), []).append(S.analyse(img)[fact] == word)
        label = f"{ck.parent.name}/{ck.name}"  # two files may share a folder
        scores[label] = {k: sum(v) / len(v) for k, v in hits.items()}
    names = list(scores)
    print(f"guidance {args.guidance:g}, {args.per_word} prompts per synonym, template 0, "
          "only the reworded fact scored")
    print("| fact | word | synonym | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---:|" * len(names))
    keys = list(next(iter(scores.values())))
    for key in keys:
        print(f"| {key[0]} | {key[1]} | {key[2]} | "
              + " | ".join(f"{scores[n][key]:.0%}" for n in names) + " |")
    for fact in SYNONYMS:
        means = [sum(v for k, v in scores[n].items() if k[0] == fact)
                 / sum(1 for k in scores[n] if k[0] == fact) for n in names]
        print(f"| **{fact}, mean** | | | " + " | ".join(f"**{m:.0%}**" for m in means) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
