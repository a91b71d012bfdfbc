"""Conversation data for supervised fine-tuning: rows of messages, checked, rendered and packed.

    chats = open_conversations(dataset, settings)        # settings: ConversationSettings; nothing is read yet
    tokenizer, name = get_tokenizer(spec, chats.text_source(), cache_dir, val_fraction)   # tokenizer.py
    data = prepare_conversations(chats, tokenizer, name, max_seq_len)   # data.prepare_data does these three
    x, y = data.batches(batch_size, seq_len, seed).next_batch()   # y is -100 wherever the assistant did not write

A row has a `messages` column: a list of {"role": "system" | "user" | "assistant", "content": str};
an assistant message may carry its steps in `thinking` (`reasoning_content`, the Qwen3 /
DeepSeek-R1 name, means the same). Rows come from local JSONL / JSON / Parquet files or folders,
a hub dataset (both through sources.py), or `arithmetic` (arithmetic.py). Each conversation is
rendered with the chat format (tokenizer.render_conversation: ids and a loss mask), and
conversations are packed whole into windows of max_seq_len + 1 tokens; one longer than a window
is cut to it, or dropped when the cut leaves the assistant nothing to write. `--thinking false`
drops every thinking field.
"""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import arithmetic
from common import atomic_write, batch_to_device
from sources import SHAKESPEARE, DataError, HubUnreachable, Shard, Source, closing, looks_like_path, open_source
from token_cache import digest, not_prepared
from tokenizer import IM_END, add_chat_format, render_conversation, render_prompt, split_reply

ARITHMETIC = "arithmetic"
ARITHMETIC_TRAIN, ARITHMETIC_VAL = 50_000, 500  # conversations; the val ones are held-out problems
ROLES = ("system", "user", "assistant")
CACHE_VERSION = 2  # 2: training conversations are shuffled before packing


# ----------------------------------------------------------------------------- checking rows

def check_messages(messages, where: str, thinking: bool = True) -> list:
    """A conversation as the chat template takes it ({"role", "content"[, "thinking"]} dicts), or a one-line
    DataError naming `where` and what is wrong. `thinking=False` drops the assistant's steps."""
    if not isinstance(messages, (list, tuple)):
        raise DataError(f"{where}: messages must be a list of {{role, content}} dicts, got {type(messages).__name__}")
    if not messages:
        raise DataError(f"{where}: the conversation is empty; drop the row or give it messages")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, str) and m.startswith("{"):  # `datasets` streams messages whose keys differ as JSON text
            try:
                m = json.loads(m)
            except ValueError:
                pass
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} is a {type(m).__name__}, not a {{role, content}} dict")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: message {i} has role {m.get('role')!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} ({m['role']}) has no text content")
        steps = m.get("thinking") or m.get("reasoning_content")
        if steps is not None and not isinstance(steps, str):
            raise DataError(f"{where}: message {i} has a thinking field that is not text "
                            f"({type(steps).__name__}); give the steps as one string")
        message = {"role": m["role"], "content": m["content"]}
        if steps and thinking and m["role"] == "assistant":
            message["thinking"] = steps
        out.append(message)
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn; drop the row")
    return out


# ----------------------------------------------------------------------------- reading rows

@dataclass(frozen=True)
class ConversationSettings:
    """What conversation data takes of a run's settings (the TrainConfig fields of the same names)."""
    cache_dir: str
    text_column: str  # part of a table source's key (sources.open_source)
    seed: int  # the built-in set's problems and the packing order
    thinking: bool  # False drops every thinking field
    max_tokens: int  # cap on the training conversations' tokens (0 = all)
    val_fraction: float  # held out when the source has no validation split
    eval_answers: int  # held-out problems whose answers are checked (the built-in set)


class Conversations:
    """A conversation dataset, opened (open_conversations) but not read: `name`, and `key`, which identifies
    its content for the caches without reading it. Its rows are read, checked and split once, on first use,
    which is only where a cache misses."""

    def __init__(self, dataset: str, settings: ConversationSettings, name: str, key, read):
        self.difficulty = builtin_difficulty(dataset)  # the built-in set's, or None
        self.builtin = self.difficulty is not None
        self.settings, self.name, self.key, self._read, self._split = settings, name, key, read, None

    def split(self) -> tuple:
        """(train conversations, val conversations, how validation was chosen), every row checked."""
        if self._split is None:
            self._split = _read_split(self._read, self.name, self.builtin, self.settings)
        return self._split

    def text_source(self) -> Source:
        """The training conversations' text as a sources.Source: what a char or BPE vocabulary for them is built
        from (tokenizer.get_tokenizer, which reads it only if that vocabulary is not cached yet)."""
        text = Shard(self.name, lambda skip: conversation_text(self.split()[0][skip:]), None)
        return Source(self.name, json.dumps([self.key, self.settings.thinking]), lambda: ("train", None),
                      lambda split: [text])


def open_conversations(dataset: str, settings: ConversationSettings) -> Conversations:
    """`dataset` (`arithmetic`, or a local or hub table with a `messages` column) -> its Conversations. Rows are
    (where, row) pairs, `where` as a user finds the row; table rows stream from the source (sources.py). The
    arithmetic set's val rows are held-out problems, which also serve the answer accuracy."""
    s, difficulty = settings, builtin_difficulty(dataset)
    if difficulty:
        name = "arithmetic (built-in)" if difficulty == "basic" else f"arithmetic (built-in, {difficulty})"

        def problems():
            return (_numbered(arithmetic.problems(ARITHMETIC_TRAIN, s.seed, False, difficulty), f"{name}, train"),
                    _numbered(arithmetic.problems(ARITHMETIC_VAL, s.seed + 1, True, difficulty), f"{name}, validation"))
        key = [ARITHMETIC, arithmetic.LEVELS, ARITHMETIC_TRAIN, s.seed] + ([difficulty] if difficulty != "basic" else [])
        return Conversations(dataset, s, name, key, problems)
    source = open_source(dataset, s.cache_dir, s.text_column)

    def read():
        train, val = source.splits()
        return (source.numbered_rows(train, ["messages"]),
                source.numbered_rows(val, ["messages"]) if val else None)

    return Conversations(dataset, s, source.name, source.key, read)


def is_conversation_data(dataset: str, cache_dir: str, text_column: str = "text") -> bool:
    """Does `dataset` hold conversations (a `messages` column) rather than text? Judged from its first row. What a
    hub dataset holds is remembered in cache_dir, so that a second run needs no network; offline, a hub dataset
    not seen before counts as text (whose path then says the hub cannot be reached)."""
    if builtin_difficulty(dataset):
        return True
    path = Path(dataset).expanduser()
    if path.exists() and not (path.is_dir() or path.suffix in (".jsonl", ".json", ".parquet")):
        return False
    if not path.exists() and (dataset == SHAKESPEARE or looks_like_path(dataset)):
        return False
    memo = Path(cache_dir, "conversations", "hub", re.sub(r"[^\w.-]", "_", dataset))
    if not path.exists() and memo.exists():
        return memo.read_text() == "conversations"
    try:
        source = open_source(dataset, cache_dir, text_column)
        with closing(source.iter_rows(source.splits()[0])) as rows:
            found = "messages" in next(rows, {})
    except (HubUnreachable, DataError, OSError):  # not a table we can read: the text path says so in its own words
        return False
    if not path.exists():
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text("conversations" if found else "text")
    return found


def builtin_difficulty(dataset: str) -> str | None:
    """The built-in set's difficulty (`arithmetic` or `arithmetic:NAME`), or None for other data; a one-line
    DataError for a difficulty that does not exist."""
    try:
        return arithmetic.difficulty_of(dataset)
    except ValueError as e:
        raise DataError(str(e)) from None


def _numbered(rows, label: str):
    """Rows as (where, row) pairs, counted from 1 as a user counts them."""
    return ((f"{label} row {i}", row) for i, row in enumerate(rows, 1))


def _checked(rows, thinking: bool):
    """The conversations of (where, row) pairs, each checked (check_messages)."""
    for where, row in rows:
        if "messages" not in row:
            raise DataError(f"{where} has no 'messages' column ({', '.join(row)}); conversation data needs one")
        yield check_messages(row["messages"], where, thinking)


def _read_split(read, name: str, builtin: bool, settings: ConversationSettings) -> tuple:
    """(train conversations, val conversations, how validation was chosen), every row checked."""
    train_rows, val_rows = read()
    train = list(_checked(train_rows, settings.thinking))
    if builtin:
        return train, list(_checked(val_rows, settings.thinking)), "held-out problems, never in training"
    if val_rows is not None:
        return train, list(_checked(val_rows, settings.thinking)), "the source's own validation split"
    k = min(max(1, round(len(train) * settings.val_fraction)), len(train) - 1)
    if len(train) < 2:
        raise DataError(f"{name} has {len(train)} conversation(s): too few to hold some out for validation")
    return train[:-k], train[-k:], f"the last {settings.val_fraction:.0%} of conversations"


# ----------------------------------------------------------------------------- packing

def pack(tokenizer, conversations, window: int, max_tokens: int = 0) -> tuple:
    """Render conversations and pack them whole, in order, into windows of `window` tokens.

    Returns (tokens (N, window), mask (N, window), counts): mask is 1 on assistant-written tokens; the
    rest of a window is filled with EOS, mask 0. counts: conversations packed, cut to fit, dropped."""
    rows, masks, counts = [], [], {"packed": 0, "truncated": 0, "dropped": 0}
    row, mask, n_tokens = [], [], 0
    for messages in conversations:
        ids, m = render_conversation(tokenizer, messages)
        if len(ids) > window:
            ids, m = ids[:window], m[:window]
            if not any(m[1:]):  # nothing the assistant writes is left to learn
                counts["dropped"] += 1
                continue
            counts["truncated"] += 1
        if len(row) + len(ids) > window:
            rows.append(row)
            masks.append(mask)
            row, mask = [], []
        row, mask = row + ids, mask + m
        counts["packed"] += 1
        n_tokens += len(ids)
        if max_tokens and n_tokens >= max_tokens:
            break
    if row:
        rows.append(row)
        masks.append(mask)
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    tokens = np.full((len(rows), window), tokenizer.eos_token_id, dtype=dtype)
    loss_mask = np.zeros((len(rows), window), dtype=bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(r)] = r
        loss_mask[i, :len(m)] = m
    return tokens, loss_mask, counts


class WindowBatches:
    """Random packed windows, batch k of rank r drawn with a generator seeded with (seed, r, k): the same
    contract as data.BatchIterator (its state is the step counter)."""

    def __init__(self, tokens, mask, batch_size, seed, rank=0, world_size=1, device="cpu"):
        self.tokens, self.mask, self.batch_size = tokens, mask, batch_size
        self.seed, self.rank, self.device, self.step = seed, rank, device, 0

    def next_batch(self):
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        rows = rng.integers(0, len(self.tokens), size=self.batch_size)
        self.step += 1
        return batch_to_device(self.tokens[rows], self.device, self.mask[rows])

    def state_dict(self):
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state):
        self.seed, self.step = int(state["seed"]), int(state["step"])


def eval_windows(tokens, mask, batch_size, max_batches=None, device="cpu"):
    """Validation windows in order: all of them, or the first max_batches * batch_size."""
    n = len(tokens) if max_batches is None else min(len(tokens), max_batches * batch_size)
    for i in range(0, n, batch_size):
        yield batch_to_device(tokens[i:i + batch_size], device, mask[i:i + batch_size])


# ----------------------------------------------------------------------------- entry point

@dataclass
class ConversationData:
    tokenizer: object
    train_tokens: np.ndarray  # (N, max_seq_len + 1) packed windows
    train_mask: np.ndarray  # (N, max_seq_len + 1) bool: 1 on assistant-written tokens
    val_tokens: np.ndarray
    val_mask: np.ndarray
    eos_id: int
    vocab_size: int
    source: str
    val_source: str
    sample_prompt: str  # a user turn for the sample at the end of training
    answer_rows: list  # held-out problems with checkable answers (the built-in set), else []
    chat: bool = True

    def batches(self, batch_size, seq_len, seed, rank=0, world_size=1, device="cpu"):
        return WindowBatches(self.train_tokens, self.train_mask, batch_size, seed, rank, world_size, device)

    def eval_batches(self, batch_size, seq_len, max_batches=None, device="cpu"):
        return eval_windows(self.val_tokens, self.val_mask, batch_size, max_batches, device)


def conversation_text(rows):
    """The text of conversations (roles, contents, steps), one document of text pieces each: what a char or BPE
    vocabulary for them is built from (the chat tokens are added afterwards)."""
    for messages in rows:
        yield iter(["\n".join(f"{m['role']}\n{m.get('thinking', '')}\n{m['content']}" for m in messages) + "\n"])


def prepare_conversations(chats: Conversations, tokenizer, tok_name: str, max_seq_len: int, rank: int = 0,
                          prepared_only: bool = False) -> ConversationData:
    """Render and pack `chats` (open_conversations) with `tokenizer` (tok_name: how a run names it), which gains
    the chat format here; the packed windows are cached in cache_dir. With `prepared_only` (under torchrun)
    only read the cache, and stop at once (NotPrepared) if it misses."""
    say = print if rank == 0 else (lambda *a, **k: None)
    add_chat_format(tokenizer)
    s, window = chats.settings, max_seq_len + 1
    fingerprint = hashlib.sha256((tokenizer.backend_tokenizer.to_str() + str(tokenizer.chat_template)).encode())
    entry = Path(s.cache_dir, "conversations", digest(
        [CACHE_VERSION, chats.key, s.thinking, fingerprint.hexdigest(), window, s.max_tokens, s.val_fraction, s.seed],
        16))
    arrays = _load_packed(entry)
    if arrays is None and prepared_only:
        raise not_prepared(f"the packed conversations of {chats.name}", s.cache_dir)
    if arrays is None:
        arrays = _pack_and_save(chats, tokenizer, window, entry, say)
    meta = json.loads((entry / "meta.json").read_text())
    cut, dropped = meta["train_truncated"] + meta["val_truncated"], meta["train_dropped"] + meta["val_dropped"]
    if cut or dropped:
        say(f"data: {cut:,} conversation(s) longer than the context of {max_seq_len} were cut to fit and "
            f"{dropped:,} dropped (nothing for the assistant left); raise --max_seq_len to keep them whole")
    if not len(arrays["train_tokens"]) or not len(arrays["val_tokens"]):
        raise DataError(f"{chats.name}: no conversation fits a window of {window} tokens; raise --max_seq_len")
    val_source = (f"{meta['validation']} ({meta['val_packed']:,} conversations, "
                  f"{int(arrays['val_mask'].sum()):,} assistant tokens)")
    say(f"data: validation: {val_source}")
    answer_rows = arithmetic.problems(s.eval_answers, s.seed + 1, True, chats.difficulty) if chats.builtin else []
    return ConversationData(tokenizer=tokenizer, eos_id=tokenizer.eos_token_id, vocab_size=len(tokenizer),
                            source=f"{chats.name} + {tok_name}{'' if s.thinking else ', answers only'}",
                            val_source=val_source, sample_prompt=meta["sample_prompt"], answer_rows=answer_rows, **arrays)


def _pack_and_save(chats: Conversations, tokenizer, window: int, entry: Path, say) -> dict:
    """Read, render and pack the conversations into the cache entry `entry`; -> its arrays."""
    s = chats.settings
    train, val, how = chats.split()
    say(f"data: rendering and packing {len(train):,} + {len(val):,} conversations of {chats.name}")
    # Packed in a seeded random order: in the source's order, each kind of conversation would keep landing at
    # the same offsets in its windows (the built-in set cycles through kinds and levels), and a model can learn
    # that, then fail a kind that starts a chat at position 0, where it never saw it.
    train = [train[i] for i in np.random.default_rng(s.seed).permutation(len(train))]
    t_tok, t_mask, t_counts = pack(tokenizer, train, window, s.max_tokens)
    v_tok, v_mask, v_counts = pack(tokenizer, val, window)
    arrays = {"train_tokens": t_tok, "train_mask": t_mask, "val_tokens": v_tok, "val_mask": v_mask}
    meta = {f"{split}_{k}": v for split, counts in (("train", t_counts), ("val", v_counts)) for k, v in counts.items()}
    sample = next((m["content"] for m in val[0] if m["role"] == "user"), "Hello!")
    _save_packed(entry, arrays, {**meta, "validation": how, "sample_prompt": sample})
    return arrays


def _load_packed(entry: Path):
    try:
        json.loads((entry / "meta.json").read_text())  # written last: the entry is whole
        return {name: np.load(entry / f"{name}.npy", allow_pickle=False)
                for name in ("train_tokens", "train_mask", "val_tokens", "val_mask")}
    except (OSError, ValueError):
        return None


def _save_packed(entry: Path, arrays: dict, meta: dict):
    """Each array to its .npy file, then meta.json, which marks the entry whole."""
    entry.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        with open(entry / f"{name}.npy.tmp", "wb") as f:
            np.save(f, array, allow_pickle=False)
        (entry / f"{name}.npy.tmp").replace(entry / f"{name}.npy")
    atomic_write(entry / "meta.json", lambda p: p.write_text(json.dumps(meta)))


# ----------------------------------------------------------------------------- answer accuracy

def answer_accuracy(model, tokenizer, rows: list, amp) -> tuple:
    """Greedy replies to held-out problems (arithmetic rows), decoded together with generate_batch.

    Returns ({"val_answer_acc": exact-match share, "val_answer_tokens": mean tokens per reply, steps and end
    of turn included}, one (row, correct, tokens) triple per row)."""
    from engine import generate_batch  # the sampling engine; imported here to keep data loading light
    prompts = [render_prompt(tokenizer, [m for m in r["messages"] if m["role"] != "assistant"]) for r in rows]
    end_of_turn = tokenizer.convert_tokens_to_ids(IM_END)
    model.eval()
    with amp:
        replies = generate_batch(model, prompts, model.cfg.max_seq_len - max(map(len, prompts)), temperature=0,
                                 eos_id=end_of_turn)
    model.train()
    results = []
    for row, reply in zip(rows, replies):
        _, answer = split_reply(tokenizer.decode(reply, skip_special_tokens=False))
        results.append((row, arithmetic.check(answer, row), len(reply)))
    return {"val_answer_acc": sum(ok for _, ok, _ in results) / len(results),
            "val_answer_tokens": sum(n for _, _, n in results) / len(results)}, results
