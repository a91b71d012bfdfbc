"""Blueberry tokenizers: building char and byte-level BPE vocabularies, loading hub and saved
tokenizers, encode / decode, the end-of-text token (EOS) every document ends with, and the chat
format (`add_chat_format`, `render_conversation`), and which tokenizer a run uses (`get_tokenizer`).

    tokenizer, name = get_tokenizer("bpe:4096", source, cache_dir, val_fraction)   # what data.prepare_data does
    tokenizer = load_tokenizer("out/tokenizer")
    ids = encode(tokenizer, "ROMEO:")
    text = decode(tokenizer, ids)

Specs (`TrainConfig.tokenizer`): "char" (one token per character of the training text, plus
EOS and UNK), "bpe" / "bpe:N" (byte-level BPE with a vocabulary of N, trained with the
`tokenizers` library), or a hub id / local folder, loaded with AutoTokenizer. Every kind is a
transformers fast tokenizer, so `save_tokenizer` / `load_tokenizer` work the same for all.
A char or BPE vocabulary is learnt from the training side of the run's source, and built and hub
tokenizers are cached in cache_dir/tokenizers/<name>-<hash>/ (data.py lists the whole cache layout).
"""

import itertools
import os
import re
import shutil
import tempfile
from pathlib import Path

from common import first_line
from sources import DataError, closing, looks_like_path, require_hub
from token_cache import digest, held_out, not_prepared, slug

EOS = "<|endoftext|>"
UNK = "<|unk|>"  # char vocabularies only: a prompt may hold a character the training text lacks
DEFAULT_BPE_VOCAB = 8192  # ~3.2 chars/token on Shakespeare; a small embedding for a few MB of text
TOKENIZER_TRAIN_CHARS = 50_000_000  # char/bpe vocabularies are built from at most this much text


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
        # every digit its own token, as in Llama's tokenizers: numbers then read the same wherever they stand,
        # which is what arithmetic needs (a merge like "835" would hide its digits from the model)
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])
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


# ----------------------------------------------------------------------------- which tokenizer a run uses

def get_tokenizer(spec, source, cache_dir, val_fraction, rank=0, prepared_only=False):
    """-> (tokenizer, description) for `spec` (TrainConfig.tokenizer) and the run's `source` (a sources.Source).

    A tokenizer object (an --init_from model's) is used as it is, a local folder is loaded; built and hub
    tokenizers are cached in cache_dir and always returned as loaded from there, so a first and a second run
    hash the same. With `prepared_only` (under torchrun, where no rank builds) a tokenizer that is not in the
    cache is NotPrepared."""
    if not isinstance(spec, str):
        return with_eos(spec), f"tokenizer {spec.name_or_path}"
    builtin = parse_builtin(spec)
    path = Path(spec).expanduser()
    if builtin is None and path.exists():
        return with_eos(load_tokenizer(path)), f"tokenizer {path}"
    if builtin is None and looks_like_path(spec):
        raise DataError(f"tokenizer folder {spec!r} does not exist; pass a folder saved with save_pretrained, "
                        f"'char', 'bpe[:N]' or a hub id")
    name, folder = _cache_folder(spec, builtin, source, cache_dir, val_fraction)
    if not (folder / "tokenizer.json").exists():
        if prepared_only:
            if builtin is None or source.hub:
                require_hub()  # unreachable: data.prepare_data falls back, as `python data.py` did
            raise not_prepared(f"the {name} tokenizer for {source.name} and its tokens", cache_dir)
        _save_atomic(_new_tokenizer(spec, builtin, name, source, val_fraction, rank), folder)
    tokenizer = load_tokenizer(folder)
    if builtin and builtin[0] == "char":
        name = f"char ({len(tokenizer) - 2} symbols)"
    elif builtin and len(tokenizer) < builtin[1] and rank == 0:  # said on every run: the spec still asks for more
        print(f"data: {name} stopped at {len(tokenizer):,} tokens: the training text has no more merges to learn; "
              f"the vocabulary is {len(tokenizer):,} (more text would give more)")
    return tokenizer, name


def _cache_folder(spec, builtin, source, cache_dir, val_fraction):
    """-> (name, folder) of a built or hub tokenizer in the cache (the layout that existing caches have)."""
    if builtin is None:
        key, name = ["hub", spec], spec
    else:  # trained on the training side of this source, so keyed by it (and by how that side is chosen)
        key = [spec, source.key, val_fraction, TOKENIZER_TRAIN_CHARS, "held out as they stream"]
        name = "char" if builtin[0] == "char" else f"bpe:{builtin[1]}"
    return name, Path(cache_dir, "tokenizers", f"{slug(name)}-{digest(key)}")


def _new_tokenizer(spec, builtin, name, source, val_fraction, rank):
    """A hub tokenizer fetched, or a char / BPE vocabulary (`builtin`, from parse_builtin) learnt from `source`."""
    if builtin is None:
        return load_hub_tokenizer(spec)
    if rank == 0:
        print(f"data: building the {name} tokenizer on {source.name}")
    with closing(_tokenizer_text(source, val_fraction)) as texts:
        first = next(texts, None)
        if first is None:
            raise DataError(f"{source.name} has no text to build the {name} tokenizer from; check the source")
        return build_tokenizer(*builtin, itertools.chain([first], texts))


def _tokenizer_text(source, val_fraction):
    """A bounded sample of the training side of the source, streamed: its first TOKENIZER_TRAIN_CHARS
    characters, skipping the documents that validate (token_cache.held_out). For a single text, at
    most its first 1 - val_fraction (its tail validates)."""
    train, val = source.splits()
    budget = TOKENIZER_TRAIN_CHARS
    if source.single_text and source.chars:
        budget = min(budget, int(source.chars * (1 - val_fraction)))
    for i, pieces in enumerate(source.documents(train)):
        if val is None and not source.single_text and held_out(i, val_fraction):
            continue
        for piece in pieces:
            yield piece[:budget]
            budget -= len(piece)
            if budget <= 0:
                return


def _save_atomic(tokenizer, folder):
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        save_tokenizer(tokenizer, tmp)
        os.replace(tmp, folder)
    except OSError:  # another process got there first with the same files
        if not (folder / "tokenizer.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the chat format

# Turns in the ChatML style, and the assistant's steps in a thinking section before its answer:
#   <|im_start|>user\nWhat is 12 + 9?<|im_end|>\n
#   <|im_start|>assistant\n<think>\n1. 2+9=11, carry 1\n2. 1+0+1=2\n</think>\n21<|im_end|>\n
# The template is the one definition of the format: training renders with it (render_conversation)
# and so does transformers' apply_chat_template. The {% generation %} block marks what the assistant
# writes (its steps, its answer and its end of turn): the only tokens with a loss.
IM_START, IM_END, THINK, END_THINK = "<|im_start|>", "<|im_end|>", "<think>", "</think>"
CHAT_TOKENS = (IM_START, IM_END, THINK, END_THINK)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{%- if message.get('thinking') -%}{{- '<think>\\n' + message['thinking'] + '\\n</think>\\n' -}}{%- endif -%}"
    "{{- message['content'] + '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def add_chat_format(tokenizer) -> int:
    """Give `tokenizer` the chat tokens (those it lacks) and the chat template; returns how many tokens it
    gained (the model's embedding must grow by as many)."""
    before = len(tokenizer)
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.get_vocab()]
    tokenizer.add_tokens(missing, special_tokens=True)  # atomic, and dropped by decode(skip_special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return len(tokenizer) - before


def render_conversation(tokenizer, messages: list) -> tuple:
    """A conversation (list of {"role", "content"[, "thinking"]}) -> (token ids, loss mask): the mask is 1 on
    the tokens the assistant writes (steps, answer, end of turn), 0 on system and user tokens."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return out["input_ids"], out["assistant_masks"]


def render_prompt(tokenizer, messages: list) -> list:
    """The ids of a conversation so far, ending where the assistant's next turn begins."""
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]


def split_reply(text: str) -> tuple:
    """An assistant's reply text (special tokens kept) -> (thinking, answer), either possibly empty."""
    text = text.split(IM_END)[0]
    if THINK in text:
        thinking, _, answer = text.partition(THINK)[2].partition(END_THINK)
        return thinking.strip("\n"), answer.strip("\n")
    return "", text.strip("\n")
