"""Blueberry tokenizers: building char and byte-level BPE vocabularies, loading hub and saved
tokenizers, encode / decode, and the end-of-text token (EOS) every document ends with.

    tokenizer = load_tokenizer("out/tokenizer")
    ids = encode(tokenizer, "ROMEO:")
    text = decode(tokenizer, ids)

Specs (`TrainConfig.tokenizer`): "char" (one token per character of the training text, plus
EOS and UNK), "bpe" / "bpe:N" (byte-level BPE with a vocabulary of N, trained with the
`tokenizers` library), or a hub id / local folder, loaded with AutoTokenizer. Every kind is a
transformers fast tokenizer, so `save_tokenizer` / `load_tokenizer` work the same for all.
Which spec a run uses, what text a vocabulary is built from and where it is cached is data.py's.
"""

import re
from pathlib import Path

from common import first_line
from sources import DataError, require_hub

EOS = "<|endoftext|>"
UNK = "<|unk|>"  # char vocabularies only: a prompt may hold a character the training text lacks
DEFAULT_BPE_VOCAB = 8192  # ~3.2 chars/token on Shakespeare; a small embedding for a few MB of text


def parse_builtin(spec):
    """'char' -> ('char', 0); 'bpe' / 'bpe:N' -> ('bpe', N); anything else -> None."""
    if spec == "char":
        return "char", 0
    m = re.fullmatch(r"bpe(?::(\d+))?", spec)
    if not m:
        return None
    n = int(m.group(1) or DEFAULT_BPE_VOCAB)
    if n <= 256:
        raise DataError(f"tokenizer {spec!r}: a byte-level BPE needs more than 256 tokens; "
                        f"use e.g. bpe:{DEFAULT_BPE_VOCAB}")
    return "bpe", n


def build_tokenizer(kind, vocab_size, texts):
    """A new "char" or "bpe" tokenizer (`kind`) with EOS, its vocabulary learnt from the strings `texts`.
    A BPE stops short of `vocab_size` when the text has no more merges to learn."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    if kind == "char":
        chars = set()
        for text in texts:
            chars.update(text)
        vocab = {tok: i for i, tok in enumerate([EOS, UNK, *sorted(chars)])}
        backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char, newlines too
        backend.decoder = decoders.Fuse()
    else:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(texts, trainer)
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, unk_token=UNK if kind == "char" else None,
                                   clean_up_tokenization_spaces=False)


def load_hub_tokenizer(spec):
    """A hub tokenizer, given EOS if it lacks one; HubUnreachable when the hub cannot be reached."""
    require_hub()
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except Exception as e:
        raise DataError(f"could not load hub tokenizer {spec!r} ({first_line(e)}); check the id, "
                        f"or use a local folder, 'char' or 'bpe'") from e
    return with_eos(tokenizer)


def with_eos(tokenizer):
    """Documents end with EOS: give a tokenizer that lacks one the GPT-2 end-of-text token."""
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no fast (tokenizers) version; "
                        f"use one with a tokenizer.json")
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": EOS})
    return tokenizer


def save_tokenizer(tokenizer, out_dir):
    """Save next to a checkpoint, so inference needs no network."""
    tokenizer.save_pretrained(str(out_dir))


def load_tokenizer(path):
    """Load a tokenizer saved with save_tokenizer (or any save_pretrained folder); local only."""
    path = Path(path).expanduser()
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise DataError(f"no tokenizer in {path} (no tokenizer.json); "
                        f"point to a folder written by save_tokenizer or save_pretrained")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def encode(tokenizer, text):
    """Text -> token ids, no special tokens added."""
    return tokenizer.encode(text, add_special_tokens=False)


def decode(tokenizer, ids):
    """Token ids -> text; special tokens (EOS) are dropped, spacing is left exactly as encoded."""
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
