"""The `export` stage: the trained policy as a Hugging Face folder that reads back to the same params."""

import json

import jax
import numpy as np
import pytest
from safetensors import safe_open

from configs import relevance
from graphgrpo_jax import artifacts, main, tokenization
from graphgrpo_jax.data import cot
from graphgrpo_jax.models import decoder, hf
from graphgrpo_jax.train import export


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("export")
    config = relevance.get_config("micro")
    config.stages = ("data", "sft", "export")
    config.sft.num_steps = 2
    config.export.policies = ("sft",)
    main.run(config, str(workdir))
    return config, str(workdir)


def test_the_folder_reads_back_to_the_trained_params(run):
    config, workdir = run
    folder = export.export_dir(workdir, "sft")
    loaded = hf.config_from_hf(folder)
    for field in hf.ARCHITECTURE_FIELDS:
        assert loaded[field] == config.model[field], field
    trained = jax.device_get(artifacts.policy_params(config, workdir, "sft"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, hf.load_params(folder, loaded), trained)
    tokenizer = tokenization.load_tokenizer(folder)
    assert tokenizer.get_vocab() == artifacts.load_tokenizer(config, workdir).get_vocab()
    assert all(tag in tokenizer.get_vocab() for tag in cot.node_tags())
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id == json.loads((folder / "config.json").read_text())[
        "eos_token_id"]


def test_bfloat16_export_and_reuse(run):
    config, workdir = run
    folder = export.export_dir(workdir, "sft")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    export.export_policy(config, workdir, "sft")  # the same step and dtype: kept as it is
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    config = relevance.get_config("micro")
    config.export.dtype = "bfloat16"
    export.export_policy(config, workdir, "sft")
    with safe_open(folder / "model.safetensors", framework="np") as f:
        assert {str(f.get_slice(name).get_dtype()) for name in f.keys()} == {"BF16"}
    trained = jax.device_get(artifacts.policy_params(config, workdir, "sft"))
    bf16 = hf.load_params(folder, dict(config.model.to_dict(), param_dtype="bfloat16"))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b).astype(a.dtype)), bf16, trained)


def test_transformers_loads_the_export_with_our_logits(run):
    torch = pytest.importorskip("torch", reason="torch (the `torch` extra) is not installed: transformers needs it "
                                                "to run the exported model")
    import transformers

    config, workdir = run
    folder = export.export_dir(workdir, "sft")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = np.asarray([[5, 17, 40, 3, 99, 12, 7, 250]], np.int64)
    with torch.no_grad():
        reference = theirs(torch.from_numpy(ids)).logits.numpy()
    params = hf.load_params(folder, hf.config_from_hf(folder))
    ours = decoder.forward(params, decoder.DecoderConfig.from_config(config.model), ids, np.ones_like(ids, bool))
    np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-4)


def test_a_missing_checkpoint_is_named(tmp_path):
    config = relevance.get_config("micro")
    with pytest.raises(FileNotFoundError, match="no rl checkpoint in .*checkpoints/rl: run the 'rl' stage first"):
        export.export_policy(config, str(tmp_path), "rl")
