"""Blueberry tokenizers: building char and byte-level BPE vocabularies, loading hub and saved
tokenizers, encode / decode, the end-of-text token (EOS) every document ends with, and the chat
format (`add_chat_format`, `render_conversation`).

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
