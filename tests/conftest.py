"""Test-wide setup: a fake 8-device CPU mesh, an XLA compilation cache, shared data paths, tiny chat checkpoints."""

import atexit
import os
import pathlib
import shutil
import tempfile

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# XLA's compilation cache, in a folder of this session only (deleted at exit): the many tests that build the
# same tiny models through fresh jit objects (each `main.run`, each fixture) load the executable XLA already
# compiled for the identical program instead of compiling it again. Results do not change: a cache hit is
# the same compiled program, and only programs that took at least 0.2 s to compile are stored.
XLA_CACHE_DIR = tempfile.mkdtemp(prefix="graphgrpo-tests-xla-cache-")
atexit.register(shutil.rmtree, XLA_CACHE_DIR, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", XLA_CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The real ESCI rows laid beside the checkout (never copied into the repo)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found beside the repo: {SHARED_DATA}")
    return SHARED_DATA


CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def make_chat_checkpoint():
    """`make(folder, corpus, vocab_size) -> folder`: a tiny random Llama-shaped Hugging Face checkpoint whose ChatML
    tokenizer (EOS and padding `<|im_end|>`) is trained on `corpus`, a stand-in for an Instruct model."""
    from configs import common
    from graphgrpo_jax import tokenization
    from graphgrpo_jax.models import decoder, hf

    def make(folder: pathlib.Path, corpus: list[str], vocab_size: int) -> pathlib.Path:
        tokenizer = tokenization.train_tokenizer(corpus * 2, vocab_size, folder, extra_special_tokens=("<|im_start|>",))
        tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"})
        tokenizer.chat_template = CHATML
        tokenizer.save_pretrained(str(folder))
        model = common.model_config("tiny", arch="llama", qkv_bias=False, vocab_size=len(tokenizer), max_seq_len=512)
        hf.save_hf(decoder.init_params(decoder.DecoderConfig.from_config(model), jax.random.PRNGKey(0)), model, folder)
        return folder

    return make
