"""A checkpoint folder fixes the model: shapes from its config.json, its tokenizer checked at start-up."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from configs import relevance
from graphgrpo_jax import config_validation, main, tokenization
from graphgrpo_jax.models import hf

LLAMA = pathlib.Path(__file__).parent / "fixtures" / "hf_llama_tiny"
CORPUS = ["query: red running shoes product: trail shoe judge:", "<qs>shoes</qs><y>Exact</y>"] * 20


def _folder(tmp_path, vocab_size=None, tokenizer_size=None) -> pathlib.Path:
    folder = pathlib.Path(shutil.copytree(LLAMA, tmp_path / "checkpoint"))
    if vocab_size is not None:
        raw = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(raw, vocab_size=vocab_size)))
    if tokenizer_size is not None:
        tokenization.train_tokenizer(CORPUS, tokenizer_size, folder)
    return folder


def _config(folder):
    config = relevance.get_config("micro")  # a from-scratch preset: every shape differs from the checkpoint
    config.model.hf_checkpoint = str(folder)
    return config


def test_shapes_come_from_config_json_and_command_line_overrides_win(tmp_path):
    folder = _folder(tmp_path)
    config = _config(folder)
    resolved = main.resolve(config, explicit={"model.max_seq_len", "sft.num_steps"})
    expected = hf.config_from_hf(folder)
    for field in hf.ARCHITECTURE_FIELDS:
        if field != "max_seq_len":
            assert resolved.model[field] == expected[field], field
    assert (resolved.model.hidden_size, resolved.model.num_kv_heads, resolved.model.arch) == (32, 1, "llama")
    assert resolved.model.max_seq_len == config.model.max_seq_len != expected.max_seq_len  # the override
    assert resolved.model.dtype == config.model.dtype  # compute choices stay the experiment's
    assert resolved.model.preset == "hf:checkpoint"
    assert config.model.hidden_size == 64  # the caller's config is not changed


def test_without_a_checkpoint_the_config_is_unchanged():
    config = relevance.get_config("micro")
    assert main.resolve(config, explicit={"model.hidden_size"}) is config


def test_a_missing_checkpoint_folder_names_the_field(tmp_path):
    with pytest.raises(config_validation.ConfigError, match=r"config.model.hf_checkpoint = .*nowhere.*no such folder"):
        main.resolve(_config(tmp_path / "nowhere"))


def test_a_folder_without_a_tokenizer_is_a_start_up_error(tmp_path):
    config = main.resolve(_config(_folder(tmp_path)))
    with pytest.raises(config_validation.ConfigError) as err:
        main.run(config, str(tmp_path / "work"))
    assert f"config.model.hf_checkpoint = '{tmp_path / 'checkpoint'}': no usable tokenizer" in str(err.value)
    assert not (tmp_path / "work").exists()  # before any work


def test_a_tokenizer_larger_than_the_embedding_is_a_start_up_error(tmp_path):
    folder = _folder(tmp_path, tokenizer_size=300)  # the checkpoint's embedding has 128 rows
    with pytest.raises(config_validation.ConfigError, match=r"tokenizer has \d+ tokens but the model's embedding "
                                                             r"has 128 rows"):
        config_validation.validate(main.resolve(_config(folder)))


def test_a_fitting_tokenizer_passes(tmp_path):
    folder = _folder(tmp_path, vocab_size=400, tokenizer_size=300)
    config_validation.validate(main.resolve(_config(folder)), stages=main.STAGES)


def test_no_room_for_the_cot_tags_is_a_start_up_error(tmp_path):
    """SmolLM2's embedding has exactly as many rows as its tokenizer: the tags that the `data` stage adds would
    index past it. Qwen2.5's has spare rows, and this fixture is given them too in the passing case above."""
    folder = _folder(tmp_path, vocab_size=300, tokenizer_size=300)
    size = len(tokenization.load_tokenizer(folder))
    with pytest.raises(config_validation.ConfigError, match=rf"adds the 14 CoT tags as whole tokens, {size + 14} in all"):
        config_validation.validate(main.resolve(_config(folder)))


def test_the_command_line_takes_the_checkpoint_shapes_and_keeps_its_own_overrides(tmp_path):
    folder = _folder(tmp_path, vocab_size=400, tokenizer_size=300)
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "graphgrpo_jax.main", "--config=configs/relevance.py:micro", f"--workdir={tmp_path / 'w'}",
         f"--config.model.hf_checkpoint={folder}", "--config.model.max_seq_len=96", "--config.stages=('data',)"],
        cwd=pathlib.Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    written = json.loads((tmp_path / "w" / "config.json").read_text())
    assert {k: written["model"][k] for k in ("arch", "hidden_size", "num_layers", "vocab_size", "max_seq_len")} == \
        {"arch": "llama", "hidden_size": 32, "num_layers": 2, "vocab_size": 400, "max_seq_len": 96}
    assert written["tokenizer"]["hf_checkpoint"] == str(folder)  # one override moves weights and tokenizer
    assert len(tokenization.load_tokenizer(tmp_path / "w" / "tokenizer")) == len(tokenization.load_tokenizer(folder)) + 14
