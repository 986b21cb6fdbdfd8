"""How much of an unseen synonym can MiniLM itself carry? A ceiling, with no image model.

    python bench/encoder_ceiling.py [--steps 300] [--seed 0]

Not a speed benchmark: the decoder-free side of the paraphrase question in docs/models.md
(issue 8). `bench/synonyms.py` measures what a trained shapes model draws for an unseen
word; this script asks what the encoder hands any decoder in the first place, so a low
figure there can be told apart from a decoder that failed to learn. For each fact
(colour, shape, position, size, background) it reads the fact back from all-MiniLM-L6-v2
in three ways, each trained only on words a training caption may contain (the grammar's
and `TRAIN_SYNONYMS`) and scored only on the evaluation's unseen synonyms (`SYNONYMS`):

- **zero-shot**: the grammar word nearest to the synonym (mean token state of the word
  alone, last layer, cosine) — what the encoder's geometry says with no training at all;
- **frozen read-out**: a linear classifier on the word's own token states inside four
  sentences, at each of the 7 hidden layers; the best layer on the unseen words is
  reported (chosen on them, so optimistic: the most a decoder reading frozen states
  linearly could get);
- **fine-tuned**: the whole encoder plus one linear head per fact, trained for `--steps`
  batches on captions drawn as `--shapes_synonym_prob 0.5` draws them, then scored on the
  one-synonym probe prompts of `bench/synonyms.py` and on whole paraphrases. The facts
  are the labels here, a far more direct signal than an image loss, so this bounds what
  `--finetune_text_encoder` could teach the encoder from shapes captions.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.synonyms import probe_prompts  # noqa: E402
from model.pretrained import (  # noqa: E402
    WIDTH,
    MiniLMTokenizer,
    PretrainedTextEncoder,
    load_bert,
)
from training.datasets import shapes as S  # noqa: E402
from training.paraphrase import SYNONYMS, TRAIN_SYNONYMS, paraphrase, reword_for_training  # noqa: E402

FACTS = tuple(SYNONYMS)
VALUES = {"colour": S.COLOURS, "shape": S.SHAPES, "position": S.POSITIONS, "size": S.SIZES,
          "background": S.BACKGROUNDS}
# Sentences a word is read inside (the frozen read-out); "{}" is the word.
CONTEXTS = ("a {} circle", "a large {} square in the center on a white background",
            "{} triangle, small, top left, black background", "the {} one")


def word_states(bert: torch.nn.Module, tok: MiniLMTokenizer, word: str, context: str
                ) -> torch.Tensor:
    """(layers, 384): the mean state of `word`'s word-pieces inside `context`, per layer."""
    before = context.split("{}")[0]
    start = 1 + len(tok.encode(before))  # after [CLS] and the words before it
    n = len(tok.encode(word))
    ids, mask = tok.encode_batch([context.format(word)], 64)
    with torch.no_grad():
        out = bert(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
    return torch.stack([h[0, start:start + n].mean(0) for h in out.hidden_states])


def linear_probe(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, classes: int
                 ) -> torch.Tensor:
    """Predicted classes of `x_test` by an L2-regularised softmax regression fit on (x, y)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mu) / sd, (x_test - mu) / sd
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 1e-2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (x_test @ w + b).argmax(1)


def training_words(fact: str) -> list[tuple[str, str]]:
    """(word, grammar word) for every word a training caption may use for `fact`."""
    return [(w, g) for g, syns in TRAIN_SYNONYMS[fact].items() for w in (g, *syns)]


def unseen_words(fact: str) -> list[tuple[str, str]]:
    return [(w, g) for g, syns in SYNONYMS[fact].items() for w in syns]


def frozen_readout(bert: torch.nn.Module, tok: MiniLMTokenizer, fact: str
                   ) -> tuple[float, int, float]:
    """(best accuracy on unseen words, its layer, accuracy on the training words in a
    held-out sentence at that layer: the read-out's own sanity check)."""
    classes = VALUES[fact]

    def table(words: list[tuple[str, str]], contexts: tuple[str, ...]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([word_states(bert, tok, w, c) for w, _ in words for c in contexts])
        y = torch.tensor([classes.index(g) for _, g in words for _ in contexts])
        return x, y  # x: (n, layers, 384)

    x, y = table(training_words(fact), CONTEXTS[:-1])
    x_held, y_held = table(training_words(fact), CONTEXTS[-1:])
    x_new, y_new = table(unseen_words(fact), CONTEXTS)
    best = (-1.0, 0, 0.0)
    for layer in range(x.shape[1]):
        xa = torch.cat([x[:, layer], x_held[:, layer]])
        ya = torch.cat([y, y_held])
        acc = (linear_probe(xa, ya, x_new[:, layer], len(classes)) == y_new).float().mean()
        if acc.item() > best[0]:
            held = (linear_probe(x[:, layer], y, x_held[:, layer], len(classes)) == y_held)
            best = (acc.item(), layer, held.float().mean().item())
    return best


def zero_shot(bert: torch.nn.Module, tok: MiniLMTokenizer, fact: str) -> float:
    """Share of unseen synonyms whose nearest grammar word (word alone, last layer) is right."""
    def emb(words: list[str]) -> torch.Tensor:
        ids, mask = tok.encode_batch(words, 16)
        with torch.no_grad():
            h = bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        m = mask.unsqueeze(-1).float()
        m[:, 0] = 0  # leave [CLS] and [SEP] out: the word's own pieces only
        m[torch.arange(len(words)), mask.sum(1) - 1] = 0
        return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    grammar = VALUES[fact]
    words = unseen_words(fact)
    near = (emb([w for w, _ in words]) @ emb(grammar).T).argmax(1).tolist()
    return sum(grammar[j] == g for j, (_, g) in zip(near, words, strict=True)) / len(words)


class Heads(torch.nn.Module):
    """The fine-tuned encoder as the image model has it (its pooled states), one linear
    head per fact."""

    def __init__(self) -> None:
        super().__init__()
        self.text = PretrainedTextEncoder(finetune=True)
        self.heads = torch.nn.ModuleDict(
            {f: torch.nn.Linear(WIDTH, len(VALUES[f])) for f in FACTS})

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        _, pooled = self.text(ids, mask)
        return {f: head(pooled) for f, head in self.heads.items()}


def fine_tuned(tok: MiniLMTokenizer, steps: int, seed: int
               ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Per-fact accuracy of a fine-tuned encoder + heads on (grammar prompts, one-synonym
    probe prompts — only the reworded fact scored, whole paraphrases)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = Heads()
    opt = torch.optim.AdamW([
        {"params": net.text.parameters(), "lr": 3e-5},  # --text_encoder_lr's default
        {"params": net.heads.parameters(), "lr": 1e-3}])

    def facts() -> dict[str, str]:
        return {f: rng.choice(VALUES[f]) for f in FACTS}

    def caption(fx: dict[str, str]) -> str:  # as ShapesDataset(synonym_prob=0.5) draws one
        if rng.random() < 0.5:
            return reword_for_training(fx, rng)
        return rng.choice(S.TEMPLATES).format(**fx)

    net.train()
    for _ in range(steps):
        batch = [facts() for _ in range(32)]
        ids, mask = tok.encode_batch([caption(fx) for fx in batch], 64)
        out = net(ids, mask)
        loss = sum(F.cross_entropy(out[f], torch.tensor([VALUES[f].index(fx[f]) for fx in batch]))
                   for f in FACTS)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()

    def score(prompts: list[str], truth: list[dict[str, str]], only: list[str] | None
              ) -> dict[str, float]:
        hits: dict[str, list[bool]] = {f: [] for f in FACTS}
        with torch.no_grad():
            for s in range(0, len(prompts), 128):
                ids, mask = tok.encode_batch(prompts[s:s + 128], 64)
                out = net(ids, mask)
                for i, fx in enumerate(truth[s:s + 128]):
                    for f in ([only[s + i]] if only else FACTS):
                        hits[f].append(VALUES[f][out[f][i].argmax().item()] == fx[f])
        return {f: sum(v) / len(v) for f, v in hits.items()}

    test = [facts() for _ in range(600)]
    grammar = score([rng.choice(S.TEMPLATES).format(**fx) for fx in test], test, None)
    rows = probe_prompts(8, seed)
    probe = score([r[3] for r in rows], [{r[0]: r[1]} for r in rows], [r[0] for r in rows])
    whole = score([paraphrase(fx, rng) for fx in test], test, None)
    return grammar, probe, whole


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="fine-tuning batches of 32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    bert = load_bert().eval()
    tok = MiniLMTokenizer.from_package()
    grammar, probe, whole = fine_tuned(tok, args.steps, args.seed)
    print(f"all-MiniLM-L6-v2; read-outs fit on training words only, scored on the "
          f"evaluation's unseen synonyms; fine-tuned: {args.steps} × 32 captions, seed {args.seed}")
    print("| fact | chance | zero-shot nearest word | frozen read-out (best layer) "
          "| fine-tuned: grammar prompts | fine-tuned: one synonym | fine-tuned: paraphrases |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for fact in FACTS:
        acc, layer, held = frozen_readout(bert, tok, fact)
        print(f"| {fact} | {1 / len(VALUES[fact]):.0%} | {zero_shot(bert, tok, fact):.0%} "
              f"| {acc:.0%} (layer {layer}; training words in a new sentence {held:.0%}) "
              f"| {grammar[fact]:.0%} | {probe[fact]:.0%} | {whole[fact]:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
