"""Hugging Face import/export against committed fixtures made by transformers (tests/fixtures/make_hf_fixtures.py).

No torch here: the fixtures hold real `save_pretrained` output and torch's logits for a batch with a
left-padded row.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from configs.common import model_config
from graphgrpo_jax.models import decoder, hf

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
NAMES = ("qwen2", "llama", "qwen3")
forward = jax.jit(decoder.forward, static_argnums=1)


def fixture(name: str) -> pathlib.Path:
    return FIXTURES / f"hf_{name}_tiny"


def copy_fixture(name: str, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(fixture(name), tmp_path / name))


def replaced(config, **changes):
    """A copy of a model ConfigDict with some fields changed."""
    return config.to_dict() | changes


def edit_config(folder: pathlib.Path, **changes) -> None:
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_transformers_logits(name):
    folder = fixture(name)
    config = hf.config_from_hf(folder)
    reference = np.load(folder / "reference.npz")
    mask = reference["attention_mask"]
    assert not mask.all()  # the batch holds a left-padded row
    logits = np.asarray(forward(hf.load_params(folder, config), decoder.DecoderConfig.from_config(config),
                                reference["input_ids"], mask))
    assert reference["logits"][mask].std() > 0.5  # perturbed weights give logits worth comparing
    assert np.abs(logits - reference["logits"])[mask].max() <= 1e-4


def test_config_from_hf_reads_each_family():
    qwen2, llama, qwen3 = (hf.config_from_hf(fixture(name)) for name in NAMES)
    assert (qwen2.arch, qwen2.qkv_bias, qwen2.qk_norm, qwen2.tie_embeddings) == ("qwen2", True, False, True)
    assert (qwen2.head_dim, qwen2.rope_theta, qwen2.num_kv_heads) == (8, 1_000_000.0, 2)
    assert (llama.arch, llama.qkv_bias, llama.tie_embeddings, llama.num_kv_heads) == ("llama", False, False, 1)
    assert (llama.rope_theta, llama.rms_norm_eps) == (500_000.0, 1e-5)
    assert (qwen3.arch, qwen3.qk_norm, qwen3.head_dim) == ("qwen3", True, 16)  # head_dim != hidden / heads
    # Every field of a preset but the LoRA ones, which are the run's choice (a checkpoint has no adapters).
    assert set(qwen2.keys()) == {key for key in model_config("tiny").keys() if not key.startswith("lora_")}


def test_config_from_hf_reads_pre_transformers_5_files(tmp_path):
    # Qwen2.5's published config.json: rope base at the top level, `torch_dtype`, no head_dim.
    folder = copy_fixture("qwen2", tmp_path)
    edit_config(folder, rope_parameters=None, rope_theta=250_000.0, dtype=None, torch_dtype="bfloat16",
                layer_types=None, sliding_window=32768)
    config = hf.config_from_hf(folder)
    assert (config.rope_theta, config.dtype, config.param_dtype, config.head_dim) == (250_000.0, "bfloat16",
                                                                                     "bfloat16", 8)


@pytest.mark.parametrize("name", NAMES)
def test_export_then_import_round_trips_exactly(name, tmp_path):
    folder = fixture(name)
    config = hf.config_from_hf(folder)
    params = hf.load_params(folder, config)
    out = hf.save_hf(params, config, tmp_path / "export", extra_config={"eos_token_id": 1})

    original, exported = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(original) == sorted(exported)
    for tensor in original:
        assert exported[tensor].dtype == original[tensor].dtype
        np.testing.assert_array_equal(exported[tensor], original[tensor], err_msg=tensor)
    with safe_open(out / "model.safetensors", framework="np") as f:
        assert f.metadata() == {"format": "pt"}

    assert hf.config_from_hf(out).to_dict() == replaced(config, preset="hf:export")
    reloaded = hf.load_params(out, hf.config_from_hf(out))
    jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded, params)
    # transformers itself reads the exported config as the original one.
    ours = transformers.AutoConfig.from_pretrained(out, local_files_only=True)
    theirs = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    for field in ("model_type", "hidden_size", "num_key_value_heads", "intermediate_size", "rms_norm_eps",
                  "tie_word_embeddings", "rope_parameters", "max_position_embeddings"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.eos_token_id == 1


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path):
    folder = copy_fixture("llama", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, folder / file, metadata={"format": "pt"})
    weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    config = hf.config_from_hf(folder)
    jax.tree_util.tree_map(np.testing.assert_array_equal, hf.load_params(folder, config),
                           hf.load_params(fixture("llama"), config))


def test_load_casts_to_the_configured_param_dtype():
    config = hf.config_from_hf(fixture("qwen3"))
    fp32 = hf.load_params(fixture("qwen3"), config)
    bf16 = hf.load_params(fixture("qwen3"), replaced(config, param_dtype="bfloat16"))
    q_norm = bf16["layers"]["self_attn"]["q_norm"]["scale"]
    assert q_norm.dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(q_norm, fp32["layers"]["self_attn"]["q_norm"]["scale"].astype("bfloat16"))


def test_unknown_architecture_is_named(tmp_path):
    folder = copy_fixture("qwen2", tmp_path)
    edit_config(folder, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        hf.config_from_hf(folder)


def test_rope_scaling_is_refused(tmp_path):
    folder = copy_fixture("llama", tmp_path)
    edit_config(folder, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope_type='linear'"):
        hf.config_from_hf(folder)


def rewrite_tensors(folder: pathlib.Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    folder = copy_fixture("qwen2", tmp_path)
    rewrite_tensors(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        hf.load_params(folder, hf.config_from_hf(folder))


def test_unexpected_tensor_is_named(tmp_path):
    # A tied model with an lm_head, or a checkpoint with more layers than its config says.
    folder = copy_fixture("qwen2", tmp_path)
    rewrite_tensors(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
    with pytest.raises(ValueError, match=r"unexpected tensor.*lm_head\.weight"):
        hf.load_params(folder, hf.config_from_hf(folder))


def test_wrong_shape_is_named(tmp_path):
    folder = copy_fixture("qwen3", tmp_path)
    rewrite_tensors(folder, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}))
    with pytest.raises(ValueError, match=r"q_norm\.weight has shape \(8,\), expected \(16,\)"):
        hf.load_params(folder, hf.config_from_hf(folder))


def test_config_mismatch_with_checkpoint_is_reported(tmp_path):
    config = replaced(hf.config_from_hf(fixture("llama")), num_kv_heads=2)
    with pytest.raises(ValueError, match=r"k_proj\.weight has shape \(8, 32\), expected \(16, 32\)"):
        hf.load_params(fixture("llama"), config)


def test_a_config_no_hf_class_expresses_is_refused():
    with pytest.raises(ValueError, match="qkv_bias=False cannot be exported as Qwen2ForCausalLM"):
        hf.hf_config_dict(model_config("tiny", qkv_bias=False))
    with pytest.raises(ValueError, match="qk_norm=True cannot be exported as LlamaForCausalLM"):
        hf.hf_config_dict(model_config("tiny", arch="llama", qk_norm=True))
