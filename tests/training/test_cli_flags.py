"""Flags of the seed's commands: the guide's defaults, booleans, and clear errors."""

from __future__ import annotations

import pytest

from training.cli import BASE_DEFAULTS, generate_main, generate_parser, train_main
from training.config import DATASET_CHOICES, TrainConfig, parse_train_args


def test_guide_defaults() -> None:
    cfg = parse_train_args([])
    # The original guide's flag table, verbatim.
    assert cfg.vocab_size == 50257
    assert cfg.text_embed_dim == 512
    assert cfg.num_text_layers == 6
    assert cfg.text_nhead == 8
    assert cfg.max_text_length == 512
    assert cfg.use_frequency_prior is True
    assert cfg.checkpoint_dir == "./checkpoints_llm"
    assert cfg.cond_drop_prob == 0.1
    assert cfg.default_guidance_scale == 1.0
    assert cfg.tokenizer == "word" and cfg.text_encoder == "scratch"


# The guide's COCO and multi-GPU commands, as a user pastes them.
GUIDE_COCO = ("--dataset coco --data_root ./data/coco --image_size 128 --batch_size 8 "
              "--num_epochs 150 --hidden_dim 512 --text_embed_dim 512 --num_text_layers 6 "
              "--max_text_length 256")
GUIDE_MULTI_GPU = ("--dataset imagenet10k --data_root ./data/imagenet --image_size 64 "
                   "--batch_size 16 --world_size 4 --hidden_dim 512 --text_embed_dim 768 "
                   "--num_text_layers 8")


def test_guide_examples_parse() -> None:
    cfg = parse_train_args(GUIDE_COCO.split(" "))
    assert (cfg.dataset, cfg.image_size, cfg.batch_size, cfg.num_epochs) == ("coco", 128, 8, 150)
    cfg = parse_train_args(GUIDE_MULTI_GPU.split(" "))
    assert cfg.world_size == 4 and cfg.text_embed_dim == 768


def test_base_defaults() -> None:
    cfg = parse_train_args([], defaults=BASE_DEFAULTS)
    assert cfg.checkpoint_dir == "./checkpoints"
    assert cfg.use_text is False and cfg.class_cond is True


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("1", True),
                                        ("false", False), ("False", False), ("0", False)])
def test_booleans(text: str, value: bool) -> None:
    assert parse_train_args(["--use_frequency_prior", text]).use_frequency_prior is value
    assert parse_train_args(["--amp", text]).amp is value


def test_resume_forms() -> None:
    assert parse_train_args(["--resume"]).resume == "latest"
    assert parse_train_args(["--resume", "x/latest.pth"]).resume == "x/latest.pth"
    assert parse_train_args([]).resume == ""


def test_sample_prompts_list() -> None:
    cfg = parse_train_args(["--sample_prompts", "a red circle", "a blue square"])
    assert cfg.sample_prompts == ["a red circle", "a blue square"]


@pytest.mark.parametrize("argv,flag", [
    (["--use_frequency_prior", "maybe"], "--use_frequency_prior"),
    (["--batch_size", "0"], "--batch_size"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--cond_drop_prob", "1.5"], "--cond_drop_prob"),
    (["--label_drop_prob", "-0.1"], "--label_drop_prob"),
    (["--ema", "1"], "--ema"),
    (["--dataset", "mnist"], "--dataset"),
    (["--tokenizer", "gpt9"], "--tokenizer"),
    (["--text_encoder", "bert"], "--text_encoder"),
    (["--text_encoder", "minilm", "--tokenizer_path", "."], "--tokenizer_path"),
    (["--tokenizer_path", "/nonexistent/tok"], "--tokenizer_path"),
    (["--finetune_text_encoder", "true"], "--finetune_text_encoder"),
    (["--text_cache_size", "-1"], "--text_cache_size"),
    (["--text_embed_dim", "30", "--text_nhead", "8"], "--text_nhead"),
    (["--device", "tpu"], "--device"),
    (["--default_guidance_scale", "0.5"], "--default_guidance_scale"),
    (["--image_size", "abc"], "--image_size"),
])
def test_bad_values_name_the_flag(argv: list[str], flag: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_train_args(argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_minilm_flags_parse() -> None:
    # minilm brings its own width, so the scratch encoder's head check does not apply.
    cfg = parse_train_args(["--text_encoder", "minilm", "--finetune_text_encoder", "true",
                            "--text_embed_dim", "30", "--text_nhead", "8"])
    assert (cfg.text_encoder, cfg.finetune_text_encoder) == ("minilm", True)


def test_model_shape_errors_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        train_main(["--hidden_dim", "36"])  # not divisible by the 8 decoder heads
    assert exc.value.code == 2
    assert "hidden_dim" in capsys.readouterr().err


def test_dataset_choices_match_registry() -> None:
    from training.datasets import DATASETS

    assert tuple(DATASETS) == DATASET_CHOICES


def test_config_is_plain() -> None:
    d = TrainConfig().to_dict()
    assert all(isinstance(v, (int, float, str, bool, list)) for v in d.values())


@pytest.mark.parametrize("argv,flag", [
    (["--prompt", "x", "--temperature", "0"], "--temperature"),
    (["--prompt", "x", "--top_p", "1.5"], "--top_p"),
    (["--prompt", "x", "--num_images", "0"], "--num_images"),
    (["--prompt", "x", "--guidance_scale", "0.5"], "--guidance_scale"),
    (["--prompt", "x", "--prompt_file", "p.txt"], "--prompt_file"),
])
def test_generate_bad_flags(argv: list[str], flag: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        generate_parser().parse_args(argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_generate_defaults() -> None:
    args = generate_parser().parse_args(["--prompt", "a photo of a cat"])
    assert args.checkpoint == "./checkpoints_llm/best_model.pth"
    assert args.output_dir == "./generated_llm"
    assert args.temperature == 1.0 and args.guidance_scale is None


def test_generate_missing_checkpoint(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = generate_main(["--checkpoint", str(tmp_path / "nope.pth"), "--prompt", "x",
                        "--output_dir", str(tmp_path / "out")])
    assert rc == 1
    assert "nope.pth" in capsys.readouterr().err


def test_generate_prompt_file_not_utf8(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """A prompts.txt saved as UTF-16 (Windows Notepad's "Unicode") is a usage error naming
    the file, not a UnicodeDecodeError traceback."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cute cat playing with a ball\n", encoding="utf-16")
    with pytest.raises(SystemExit) as exc:
        generate_main(["--checkpoint", str(tmp_path / "nope.pth"), "--prompt_file",
                       str(prompts), "--output_dir", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--prompt_file" in err and "prompts.txt" in err and "UTF-8" in err


@pytest.mark.parametrize("sub", ["train", "generate", "eval"])
def test_promptpix_subcommands_dispatch(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    from promptpix_cli import main

    with pytest.raises(SystemExit) as exc:
        main([sub, "--help"])
    assert exc.value.code == 0
    assert "--checkpoint" in capsys.readouterr().out or sub == "train"
