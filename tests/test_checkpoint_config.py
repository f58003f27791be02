"""A checkpoint folder fixes the model: shapes from its config.json, its tokenizer checked at start-up."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import relevance
from graphgrpo_jax import config_validation, main, tokenization
from graphgrpo_jax.models import hf

LLAMA = pathlib.Path(__file__).parent / "fixtures" / "hf_llama_tiny"
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
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


def test_no_room_for_the_cot_tags_grows_the_embedding_unless_its_size_is_set(tmp_path):
    """SmolLM2's embedding has exactly as many rows as its tokenizer: the tags the `data` stage adds need new
    rows. Qwen2.5's has spare rows (the passing case above keeps its vocab)."""
    folder = _folder(tmp_path, vocab_size=300, tokenizer_size=300)
    size = len(tokenization.load_tokenizer(folder))
    assert size + 14 > 300
    resolved = main.resolve(_config(folder))
    assert resolved.model.vocab_size == -(-(size + 14) // 64) * 64  # rounded up to a multiple of 64
    config_validation.validate(resolved)
    config = _config(folder)
    config.model.vocab_size = 300  # as `--config.model.vocab_size=300` would
    pinned = main.resolve(config, explicit={"model.vocab_size"})
    with pytest.raises(config_validation.ConfigError, match=rf"adds the 14 CoT tags as whole tokens, {size + 14} in all"):
        config_validation.validate(pinned)


def test_grown_rows_are_the_mean_of_the_checkpoints(tmp_path):
    folder = LLAMA  # untied: both the embedding and the head grow
    config = hf.config_from_hf(folder)
    original = hf.load_params(folder, config)
    grown = hf.load_params(folder, dict(config.to_dict(), vocab_size=config.vocab_size + 7), grow_vocab=True)
    np.testing.assert_array_equal(grown["embed_tokens"][:128], original["embed_tokens"])
    np.testing.assert_allclose(grown["embed_tokens"][128:],
                               np.broadcast_to(original["embed_tokens"].mean(0), (7, 32)), rtol=1e-6)
    np.testing.assert_allclose(grown["lm_head"][:, 128:],
                               np.broadcast_to(original["lm_head"].mean(1)[:, None], (32, 7)), rtol=1e-5)
    with pytest.raises(ValueError, match=r"tensor (model.embed_tokens|lm_head).weight has shape"):
        hf.load_params(folder, dict(config.to_dict(), vocab_size=config.vocab_size + 7))  # growing is opt-in


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


def test_sft_starts_from_a_checkpoint_whose_embedding_had_no_room_for_the_tags(tmp_path):
    """data → SFT from a checkpoint whose embedding rows equal its tokenizer (as SmolLM2's do)."""
    import jax

    from configs import common
    from graphgrpo_jax import artifacts
    from graphgrpo_jax.models import decoder

    from graphgrpo_jax.data import prepare

    folder = tmp_path / "checkpoint"
    world = prepare.load_world(relevance.get_config("micro"))
    tokenizer = tokenization.train_tokenizer(prepare.corpus(world), 1000, folder)  # without the CoT tags
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(str(folder))
    size = len(tokenizer)
    model = common.model_config("tiny", vocab_size=size)
    params = decoder.init_params(decoder.DecoderConfig.from_config(model), jax.random.PRNGKey(3))
    hf.save_hf(params, model, folder)
    config = _config(folder)
    config.stages = ("data", "sft", "export")
    config.sft.num_steps = 2
    config.export.policies = ("sft",)
    main.run(config, str(tmp_path / "work"))
    written = json.loads((tmp_path / "work" / "config.json").read_text())
    assert written["model"]["vocab_size"] == -(-(size + 14) // 64) * 64
    tuned = artifacts.policy_params(main.resolve(config), str(tmp_path / "work"))
    assert tuned["embed_tokens"].shape == (written["model"]["vocab_size"], model.hidden_size)
    np.testing.assert_allclose(np.asarray(tuned["embed_tokens"][:size]), np.asarray(params["embed_tokens"]), atol=0.05)
    # The export carries the grown embedding and the checkpoint's chat template with the tags added.
    exported = tmp_path / "work" / "export" / "sft"
    assert json.loads((exported / "config.json").read_text())["vocab_size"] == written["model"]["vocab_size"]
    exported_tokenizer = tokenization.load_tokenizer(exported)
    assert exported_tokenizer.chat_template == TEMPLATE and len(exported_tokenizer) == size + 14


def test_the_cot_tags_rows_start_from_the_tokens_of_their_text(tmp_path):
    """With one shared mean row, tied logits cannot tell the 14 tags apart (SmolLM2 wrote `</y>` for every
    tag after 150 SFT steps): each tag's row is the mean of the rows its text had."""
    from graphgrpo_jax import artifacts
    from graphgrpo_jax.data import cot

    folder = _folder(tmp_path, vocab_size=400, tokenizer_size=300)  # a tokenizer without the tags, spare rows
    tokenizer = tokenization.load_tokenizer(folder)
    resolved = main.resolve(_config(folder))
    original = hf.load_params(folder, resolved.model, grow_vocab=True)["embed_tokens"]
    params = artifacts.pretrained_params(resolved)
    embed = np.asarray(params["embed_tokens"])
    with_tags = tokenization.load_tokenizer(folder)
    tokenization.add_whole_tokens(with_tags, cot.node_tags())
    rows = []
    for tag in cot.node_tags():
        pieces = tokenizer(tag, add_special_tokens=False)["input_ids"]
        assert len(pieces) > 1  # the checkpoint's tokenizer splits the tag
        row = with_tags.convert_tokens_to_ids(tag)
        np.testing.assert_allclose(embed[row], original[pieces].mean(0), rtol=1e-5, atol=1e-7)
        rows.append(row)
    assert len({embed[r].tobytes() for r in rows}) == 14  # distinct rows
    np.testing.assert_array_equal(embed[:len(tokenizer)], original[:len(tokenizer)])  # the rest is untouched
