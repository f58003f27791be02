r"""A stand-in Hugging Face checkpoint folder: a model preset's exact shapes with random weights, and a BPE
tokenizer trained on the synthetic world, for rehearsing the real-checkpoint variants where the real
weights are not at hand (a machine without hub access, a dry run of a pod job).

  python experiments/standin_checkpoint.py --preset=qwen2.5-1.5b --out=/tmp/standin-1.5b
  python -m graphgrpo_jax.main --config=configs/relevance_pod.py:gpu8 \
      --config.model.hf_checkpoint=/tmp/standin-1.5b --workdir=/tmp/pod_rehearsal

The folder has what a downloaded checkpoint has (config.json, model.safetensors, tokenizer.json), so the
run exercises everything the real one does: the data stage's tokenizer import, the safetensors import
into the mesh, memory and step times at the real shape. Its accuracy figures mean nothing.
"""

import pathlib

import jax
import ml_collections
from absl import app, flags, logging

from configs import common, relevance
from graphgrpo_jax import tokenization
from graphgrpo_jax.data import cot, prepare
from graphgrpo_jax.models import decoder, hf

_PRESET = flags.DEFINE_enum("preset", "qwen2.5-1.5b", sorted(common.MODEL_PRESETS), "Model shape.")
_OUT = flags.DEFINE_string("out", None, "The checkpoint folder to write.")
_VOCAB = flags.DEFINE_integer("tokenizer_vocab", None, "BPE size (default: 8192, or what the preset's vocab "
                              "leaves beside the CoT tags); the world's text needs no more.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Tensor dtype in the file.")


def write_checkpoint(folder, model: ml_collections.ConfigDict, texts, tokenizer_vocab: int, seed: int = 0):
    """Writes config.json + model.safetensors (random weights of `model`'s shape, in its param dtype) and a
    byte-level BPE of `tokenizer_vocab` tokens trained on `texts`, without the CoT tags (as a downloaded
    checkpoint has none), to `folder`; returns the tokenizer."""
    params = decoder.init_params(decoder.DecoderConfig.from_config(model), jax.random.PRNGKey(seed))
    hf.save_hf(params, model, folder)
    return tokenization.train_tokenizer(texts, tokenizer_vocab, folder)


def main(_):
    if not _OUT.value:
        raise app.UsageError("--out is required")
    model = common.model_config(_PRESET.value, param_dtype=_DTYPE.value)
    spare = model.vocab_size - len(cot.node_tags())
    vocab = min(8192, spare) if _VOCAB.value is None else _VOCAB.value
    if vocab > spare:
        raise ValueError(f"--tokenizer_vocab={vocab} plus {len(cot.node_tags())} CoT tags does not fit the "
                         f"{model.vocab_size}-row embedding of {_PRESET.value}")
    world = prepare.load_world(relevance.get_config("cpu"))
    tokenizer = write_checkpoint(pathlib.Path(_OUT.value), model, prepare.corpus(world), vocab)
    logging.info("%s: random %s weights (%s) and a %d-token tokenizer", _OUT.value, _PRESET.value, _DTYPE.value,
                 len(tokenizer))


if __name__ == "__main__":
    app.run(main)
