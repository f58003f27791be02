"""Byte-level BPE tokenizers: train one on a corpus, save and load Hugging Face tokenizer folders, encode prompts.

Byte-level BPE covers every string (no unknown token) and decodes back to it exactly, and a
`PreTrainedTokenizerFast` gives character offsets per token (`return_offsets_mapping=True`), which the
CoT parser needs to map node character spans onto token spans. Offsets are not trimmed: a token's span
includes the space it starts with, so the spans of a text's tokens tile it with no gaps.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | pathlib.Path,
                    extra_special_tokens: Sequence[str] = ()) -> transformers.PreTrainedTokenizerFast:
    """Trains a byte-level BPE of at most `vocab_size` tokens, saves it to `out_dir` and returns it.

    Ids 0 and 1 are `PAD_TOKEN` and `EOS_TOKEN`; `extra_special_tokens` (e.g. CoT tags that must stay
    whole) follow. Nothing is added around encoded text: callers append EOS where a sequence ends.
    """
    special = [PAD_TOKEN, EOS_TOKEN, *extra_special_tokens]
    if len(set(special)) != len(special):
        raise ValueError(f"duplicate special tokens in {special}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(special) + len(alphabet):
        raise ValueError(f"vocab_size={vocab_size} is below the {len(special)} special tokens plus the "
                         f"{len(alphabet)}-symbol byte alphabet")

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet,
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
        additional_special_tokens=list(extra_special_tokens), clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def checkpoint_tokenizer(checkpoint: str | pathlib.Path, out_dir: str | pathlib.Path,
                         extra_special_tokens: Sequence[str] = ()) -> transformers.PreTrainedTokenizerBase:
    """A pretrained checkpoint's own tokenizer, with `extra_special_tokens` (the CoT tags) added as whole
    tokens, saved to `out_dir`.

    The tags get ids after the checkpoint's vocabulary; Qwen2.5's embedding matrix has spare rows beyond
    its tokenizer (151,936 vs 151,665), so they index existing (untrained) embeddings and the model needs no
    resizing. Text without tags encodes exactly as with the checkpoint's tokenizer.
    """
    tokenizer = load_tokenizer(checkpoint)
    add_whole_tokens(tokenizer, extra_special_tokens)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def add_whole_tokens(tokenizer: transformers.PreTrainedTokenizerBase, tokens: Sequence[str]) -> dict[str, int]:
    """Adds the `tokens` the tokenizer lacks as special (never split) tokens, in place; returns their new ids."""
    new = [token for token in tokens if token not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    return {token: tokenizer.convert_tokens_to_ids(token) for token in new}


def load_tokenizer(folder: str | pathlib.Path) -> transformers.PreTrainedTokenizerBase:
    """A tokenizer folder (ours, or a checkpoint's own) loaded offline, with a pad and an EOS token.

    Checkpoints without a pad token (Llama) pad with EOS: padding is masked out everywhere, so the id
    only has to exist.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: tokenizer folder not found")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{folder}: a fast tokenizer (tokenizer.json) is needed for offset mappings")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{folder}: the tokenizer defines no eos_token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_batch(tokenizer: transformers.PreTrainedTokenizerBase, texts: Sequence[str], max_len: int,
                 padding_side: str = "left") -> tuple[np.ndarray, np.ndarray]:
    """Token ids [B, max_len] int32 and mask [B, max_len] bool, padded with the pad id to a fixed length.

    A fixed length keeps jitted shapes static. Left padding (the default) is what generation wants: every
    row's last column is its last real token. A text longer than `max_len` is an error, never truncated.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r} is not 'left' or 'right'")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    ids = np.full((len(encoded), max_len), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(encoded), max_len), bool)
    for row, row_ids in enumerate(encoded):
        if len(row_ids) > max_len:
            raise ValueError(f"text {row} has {len(row_ids)} tokens, more than max_len={max_len}: "
                             f"{texts[row][:60]!r}")
        span = slice(max_len - len(row_ids), max_len) if padding_side == "left" else slice(0, len(row_ids))
        ids[row, span] = row_ids
        mask[row, span] = True
    return ids, mask
