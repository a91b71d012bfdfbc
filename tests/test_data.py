"""Tests for data.py: prepare_data, the token cache, the train/val split, the batch iterators,
the hub fallback and one-line errors for bad input.

Offline by construction: HF_HUB_OFFLINE=1 is set before anything imports huggingface_hub,
and every text is written by the test into tmp_path.
"""

import io
import json
import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

import data
import sources
import token_cache
from config import TrainConfig
from conftest import assert_one_line_error, documents, make_cfg, make_text, one_line_error, run_script, stand_in_hub
from data import BatchIterator, DataError, eval_batches, prepare_data
from tokenizer import decode, load_tokenizer, save_tokenizer

# ----------------------------------------------------------------------------- sources to tokens

def test_txt_file_char_splits_by_tokens(tmp_path):
    text = make_text(400)
    (tmp_path / "input.txt").write_text(text)
    d = prepare_data(make_cfg(tmp_path, tmp_path / "input.txt", val_fraction=0.1), max_seq_len=32)
    assert d.source.startswith("input.txt (1 file) + char")
    assert d.vocab_size == len(d.tokenizer) == len(set(text)) + 2  # + EOS and UNK
    assert d.train_tokens.dtype == np.uint16
    all_ids = np.concatenate([d.train_tokens, d.val_tokens])
    assert all_ids[-1] == d.eos_id and (all_ids == d.eos_id).sum() == 1  # one document, one EOS
    assert decode(d.tokenizer, all_ids) == text
    assert abs(len(d.val_tokens) - len(all_ids) * 0.1) <= 1  # the last val_fraction of the tokens
    assert d.sample_prompt and all(word in text for word in d.sample_prompt.split())


def test_chunked_tokenization_matches_and_respects_max_tokens(tmp_path, monkeypatch):
    text = make_text(500)
    (tmp_path / "a.txt").write_text(text)
    whole = prepare_data(make_cfg(tmp_path / "1", tmp_path / "a.txt"), max_seq_len=16)
    monkeypatch.setattr(sources, "PIECE_CHARS", 50)
    monkeypatch.setattr(token_cache, "BATCH_CHARS", 300)
    long_line = "x" * 500 + "\n" + "y\n" * 100
    pieces = list(sources._pieces(long_line))
    assert "".join(pieces) == long_line and max(map(len, pieces)) <= 100
    chunked = prepare_data(make_cfg(tmp_path / "2", tmp_path / "a.txt"), max_seq_len=16)
    np.testing.assert_array_equal(chunked.train_tokens, whole.train_tokens)
    np.testing.assert_array_equal(chunked.val_tokens, whole.val_tokens)
    capped = prepare_data(make_cfg(tmp_path / "3", tmp_path / "a.txt", max_tokens=1000), max_seq_len=16)
    assert len(capped.train_tokens) + len(capped.val_tokens) == 1000


def test_large_vocab_uses_uint32(tmp_path):
    text = "".join([chr(c) for c in range(0x4E00, 0x30000) if chr(c).isprintable()][:66_000]) * 2
    (tmp_path / "wide.txt").write_text(text)
    d = prepare_data(make_cfg(tmp_path, tmp_path / "wide.txt"), max_seq_len=16)
    assert d.vocab_size > 65536 and d.train_tokens.dtype == np.uint32
    assert decode(d.tokenizer, np.concatenate([d.train_tokens, d.val_tokens])) == text


# ----------------------------------------------------------------------------- cache

def test_cache_is_reused_without_tokenizing(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text(make_text(400))
    cfg = make_cfg(tmp_path, tmp_path / "a.txt", "bpe:300")
    first = prepare_data(cfg, max_seq_len=32)

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache was complete")

    monkeypatch.setattr(token_cache, "_build", fail)
    monkeypatch.setattr("tokenizer.build_tokenizer", fail)  # where the tokenizer is chosen and built
    start = time.perf_counter()
    second = prepare_data(cfg, max_seq_len=32)
    assert time.perf_counter() - start < 1.0
    np.testing.assert_array_equal(second.train_tokens, first.train_tokens)
    np.testing.assert_array_equal(second.val_tokens, first.val_tokens)
    assert isinstance(second.train_tokens, np.memmap)
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    # a different max_seq_len reuses the same entry: the split is applied at load time
    prepare_data(cfg, max_seq_len=48)


def test_half_written_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text(make_text(400))
    cfg = make_cfg(tmp_path, tmp_path / "a.txt")
    first = prepare_data(cfg, max_seq_len=32)
    expected_train, expected_val = np.array(first.train_tokens), np.array(first.val_tokens)
    del first  # its memmap must not see the file being corrupted below
    (meta,) = (tmp_path / "cache" / "tokens").glob("*.json")
    calls = []
    real = token_cache._build
    monkeypatch.setattr(token_cache, "_build", lambda *a: calls.append(1) or real(*a))

    meta.unlink()  # as if killed between writing the tokens and the metadata
    meta.with_suffix(".bin").write_bytes(b"\x01\x02\x03")
    again = prepare_data(cfg, max_seq_len=32)
    assert calls and meta.exists()
    np.testing.assert_array_equal(again.train_tokens, expected_train)

    calls.clear()  # metadata present but the token file is truncated: also not used
    del again
    with open(meta.with_suffix(".bin"), "r+b") as f:
        f.truncate(10)
    again = prepare_data(cfg, max_seq_len=32)
    assert calls
    np.testing.assert_array_equal(again.val_tokens, expected_val)


def test_changed_file_is_retokenized(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(make_text(300))
    cfg = make_cfg(tmp_path, path)
    first = prepare_data(cfg, max_seq_len=16)
    path.write_text(make_text(300, seed=1))
    second = prepare_data(cfg, max_seq_len=16)
    assert decode(second.tokenizer, second.train_tokens) != decode(first.tokenizer, first.train_tokens)


# ----------------------------------------------------------------------------- split and batches

def test_split_has_no_overlap(tmp_path):
    (tmp_path / "a.txt").write_text(make_text(600))
    d = prepare_data(make_cfg(tmp_path, tmp_path / "a.txt", val_fraction=0.2), max_seq_len=24)
    train_lines = set(decode(d.tokenizer, d.train_tokens).split("\n"))
    val_lines = set(decode(d.tokenizer, d.val_tokens).split("\n")[1:-1])  # drop the line cut by the split
    assert val_lines and not train_lines & val_lines
    assert not np.shares_memory(d.train_tokens, d.val_tokens)
    train_text, batches = decode(d.tokenizer, d.train_tokens), BatchIterator(d.train_tokens, 8, 24, seed=0)
    for _ in range(20):  # every training window lies inside the train array
        x, y = batches.next_batch()
        assert all(decode(d.tokenizer, row.tolist()) in train_text for row in torch.cat([x, y[:, -1:]], 1))


def test_too_short_validation_part_grows_to_one_window(tmp_path):
    rows = [{"text": f"doc {i} is short\n"} for i in range(60)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = prepare_data(make_cfg(tmp_path, tmp_path / "a.jsonl"), max_seq_len=64)
    assert len(d.val_tokens) == 65  # 1% of the 60 documents is none: the last 1% of tokens, grown to a window
    assert d.val_source.startswith("the last 1% of tokens (65 tokens, grown to hold one window): "), d.val_source


def test_too_few_held_out_documents_are_said_in_plain_words(tmp_path):
    """What was held out, and why it could not validate (it once read "the documents held out as they stream
    (0 of 38) could not fill a window")."""
    rows = [{"text": f"doc {i} is short\n"} for i in range(150)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = prepare_data(make_cfg(tmp_path, tmp_path / "a.jsonl"), max_seq_len=64)
    held = len("doc 99 is short\n") + 1  # one token a character, and EOS: the one document in 100 held out
    assert d.val_source.endswith(f": holding out 1% of the documents gave 1 of 150 ({held} tokens), too few to "
                                 f"fill one window of 65 tokens"), d.val_source


def test_validation_is_named_on_every_run(tmp_path, capsys):
    own, corpus = tmp_path / "own", tmp_path / "corpus"
    own.mkdir(), corpus.mkdir()
    (own / "train.txt").write_text(make_text(200))
    (own / "validation.txt").write_text(make_text(50, tag="V"))
    for i in range(4):
        (corpus / f"part{i}.txt").write_text(make_text(100, seed=i))
    (tmp_path / "a.txt").write_text(make_text(300))
    cases = [(own, 0.01, "the source's own 'validation' split (1 document, {:,} tokens)"),
             (corpus, 0.25, "25% of documents, held out as they stream (1 of 4, {:,} tokens)"),
             (tmp_path / "a.txt", 0.1, "the last 10% of tokens of the single text ({:,} tokens)")]
    for dataset, val_fraction, expected in cases:
        for run in ("built", "cached"):  # a reused cache entry says it too
            d = prepare_data(make_cfg(tmp_path, dataset, val_fraction=val_fraction), max_seq_len=16)
            assert d.val_source == expected.format(len(d.val_tokens))
            out = capsys.readouterr().out
            assert [line for line in out.splitlines() if line.startswith("data: validation")] == [f"data: validation: {d.val_source}"]
            assert ("data: tokenizing" in out) == (run == "built"), out
    prepare_data(make_cfg(tmp_path, own), max_seq_len=16, rank=1)  # only rank 0 speaks
    assert capsys.readouterr().out == ""


def test_batches_shapes_shift_and_ranks(tmp_path):
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = BatchIterator(tokens, 4, 16, seed=1).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))
    rank0 = BatchIterator(tokens, 4, 16, seed=1, rank=0, world_size=2).next_batch()[0]
    rank1 = BatchIterator(tokens, 4, 16, seed=1, rank=1, world_size=2).next_batch()[0]
    assert torch.equal(rank0, BatchIterator(tokens, 4, 16, seed=1, rank=0, world_size=2).next_batch()[0])
    assert not torch.equal(rank0, rank1)
    assert not torch.equal(rank0, BatchIterator(tokens, 4, 16, seed=2).next_batch()[0])


def test_iterator_state_restores_the_same_batches():
    tokens = np.random.default_rng(0).integers(0, 500, 5000).astype(np.uint16)
    batches = BatchIterator(tokens, 4, 32, seed=7)
    for _ in range(3):
        batches.next_batch()
    buffer = io.BytesIO()
    torch.save({"data": batches.state_dict()}, buffer)
    expected = [batches.next_batch() for _ in range(3)]
    buffer.seek(0)
    resumed = BatchIterator(tokens, 4, 32, seed=999)  # the state carries the seed
    resumed.load_state_dict(torch.load(buffer, weights_only=True)["data"])
    for (x, y), (ex, ey) in zip((resumed.next_batch() for _ in range(3)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_eval_batches_are_fixed_and_spread():
    tokens = np.arange(1001, dtype=np.uint16)
    everything = list(eval_batches(tokens, 8, 10))
    xs = torch.cat([x for x, _ in everything])
    assert len(xs) == 100 and torch.equal(xs.flatten(), torch.arange(1000))  # non-overlapping, all of it
    assert torch.equal(torch.cat([y for _, y in everything]).flatten(), torch.arange(1, 1001))
    sample = list(eval_batches(tokens, 4, 10, max_batches=3))
    again = list(eval_batches(tokens, 4, 10, max_batches=3))
    assert len(sample) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(sample, again))
    starts = torch.cat([x[:, 0] for x, _ in sample])
    assert len(set(starts.tolist())) == 12 and starts.max() > 800  # spread over the split


# ----------------------------------------------------------------------------- offline hub defaults

def test_hub_defaults_fall_back_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tokenizer.DEFAULT_BPE_VOCAB", 300)  # the real default takes seconds to train
    start = time.perf_counter()
    d = prepare_data(TrainConfig(cache_dir=str(tmp_path / "cache"), max_tokens=20_000), max_seq_len=64)
    assert time.perf_counter() - start < 30
    lines = [line for line in capsys.readouterr().out.splitlines() if "falling back" in line]
    assert len(lines) == 1 and "shakespeare" in lines[0] and "bpe" in lines[0], lines
    assert d.source.startswith("shakespeare (embedded") and d.source.endswith("+ bpe:300")


def test_non_default_hub_ids_offline_are_errors(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(make_text(100))
    for tokenizer in ("char", TrainConfig.tokenizer):  # with the default tokenizer too: no fallback
        with pytest.raises(DataError) as e:
            prepare_data(make_cfg(tmp_path, "someone/some-dataset", tokenizer), max_seq_len=16)
        one_line_error(e, "someone/some-dataset", "HF_HUB_OFFLINE")
    with pytest.raises(DataError) as e:
        prepare_data(make_cfg(tmp_path, tmp_path / "a.txt", "someone/some-tokenizer"), max_seq_len=16)
    one_line_error(e, "someone/some-tokenizer")
    assert "falling back" not in capsys.readouterr().out


def test_hub_ids_with_a_stand_in_hub_then_offline_from_cache(tmp_path, monkeypatch):
    """A hub id goes through the same `datasets` streaming code as a local folder: the stand-in hub
    resolves the id to a folder of JSONL files; the tokens then come from the cache, offline."""
    import datasets
    import transformers
    (tmp_path / "a.txt").write_text(make_text(300))
    save_tokenizer(prepare_data(make_cfg(tmp_path, tmp_path / "a.txt", "bpe:300"), 16).tokenizer, tmp_path / "tok")
    train, test = [make_text(5, seed=i) for i in range(30)], [make_text(5, seed=100 + i) for i in range(4)]
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
    (hub / "test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in test))
    real_from_pretrained = transformers.AutoTokenizer.from_pretrained
    stand_in_hub(monkeypatch, {"someone/ds": hub})
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name, **kwargs: real_from_pretrained(
        str(tmp_path / "tok") if name == "someone/tok" else name, **kwargs))
    cfg = make_cfg(tmp_path, "someone/ds", "someone/tok")
    d = prepare_data(cfg, max_seq_len=16)
    assert d.source == "someone/ds + someone/tok"
    assert documents(d) == train + test and decode(d.tokenizer, d.val_tokens) == "".join(test)
    assert d.val_source.startswith("the source's own 'test' split (4 documents, ")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a second run needs no network at all
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda *a, **k: 1 / 0)
    again = prepare_data(cfg, max_seq_len=16)
    np.testing.assert_array_equal(again.val_tokens, d.val_tokens)


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_one_line_errors(tmp_path):
    (tmp_path / "ok.txt").write_text(make_text(50))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "notes.docx").write_text("binary, really")
    (tmp_path / "tiny.txt").write_text("hello there\n")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    (tmp_path / "body.jsonl").write_text(json.dumps({"body": "text"}) + "\n")
    (tmp_path / "numbers.jsonl").write_text(json.dumps({"text": 5}) + "\n")
    (tmp_path / "latin1.txt").write_bytes(make_text(50).encode() + "café".encode("latin-1"))
    (tmp_path / "empty_dir").mkdir()
    for folder, files in {"mixed": ["a.txt", "b.csv"], "val_only": ["validation.txt"]}.items():
        (tmp_path / folder).mkdir()
        for name in files:
            (tmp_path / folder / name).write_text("text\nsome text\n")
    cases = [
        (tmp_path / "missing.txt", "char", ["does not exist"]),
        (tmp_path / "notes.docx", "char", ["unsupported file type", ".docx"]),
        (tmp_path / "empty.txt", "char", ["empty"]),
        (tmp_path / "empty_dir", "char", ["no .txt"]),
        (tmp_path / "blank.jsonl", "char", ["no text"]),
        (tmp_path / "blank.jsonl", "bpe:300", ["no text"]),
        (tmp_path / "tiny.txt", "char", ["too short", "max_seq_len"]),
        (tmp_path / "body.jsonl", "char", ["no column 'text'", "body", "--text_column"]),
        (tmp_path / "numbers.jsonl", "char", ["not text", "--text_column"]),
        (tmp_path / "latin1.txt", "bpe:300", ["not UTF-8"]),
        (tmp_path / "mixed", "char", ["mixes file types"]),
        (tmp_path / "val_only", "char", ["train*"]),
        (tmp_path / "ok.txt", str(tmp_path / "no_such_tokenizer"), ["does not exist"]),
        (tmp_path / "ok.txt", "bpe:100", ["more than 256"]),
    ]
    for dataset, tokenizer, words in cases:
        with pytest.raises(DataError) as e:
            prepare_data(make_cfg(tmp_path, dataset, tokenizer), max_seq_len=64)
        one_line_error(e, *words)
    with pytest.raises(DataError) as e:
        load_tokenizer(tmp_path / "nowhere")
    one_line_error(e, "nowhere")


def test_under_torchrun_a_rank_only_reads_a_prepared_cache(tmp_path, monkeypatch):
    """In a process group of more than one, a missing tokenizer or token entry stops at once with the
    command that prepares it, and nothing is written; a prepared cache is read as usual."""
    (tmp_path / "a.txt").write_text(make_text(300))
    cfg, cache = make_cfg(tmp_path, tmp_path / "a.txt", "bpe:300", max_tokens=3000), str((tmp_path / "cache").resolve())

    def as_rank(rank, world):
        monkeypatch.setattr(data, "world_info", lambda: (rank, world))

    as_rank(1, 2)
    with pytest.raises(data.NotPrepared) as e:
        prepare_data(cfg, max_seq_len=16)
    one_line_error(e, "the bpe:300 tokenizer", "are not in " + cache, "python data.py")
    assert not (tmp_path / "cache").exists()
    as_rank(0, 1)
    prepare_data(make_cfg(tmp_path, tmp_path / "a.txt", "bpe:300", max_tokens=2000), max_seq_len=16)  # another cap
    as_rank(1, 2)
    with pytest.raises(data.NotPrepared) as e:  # the tokenizer is there, not these tokens
        prepare_data(cfg, max_seq_len=16)
    one_line_error(e, "the tokens of a.txt (1 file) + bpe:300", "are not in " + cache, "python data.py")
    assert len(list((tmp_path / "cache").rglob("*.bin"))) == 1
    as_rank(0, 1)
    prepared = prepare_data(cfg, max_seq_len=16)
    as_rank(1, 2)
    np.testing.assert_array_equal(prepare_data(cfg, max_seq_len=16).train_tokens, prepared.train_tokens)


def test_data_py_counts_tokens_not_windows(tmp_path):
    """Conversations come as packed windows (2-D): python data.py reports their tokens, as run_train.py does,
    not the number of windows."""
    proc = run_script("data.py", "--dataset", "arithmetic", "--tokenizer", "char", "--max_tokens", 5000,
                      "--max_seq_len", 64, "--cache_dir", tmp_path / "cache", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = prepare_data(make_cfg(tmp_path, "arithmetic", max_tokens=5000), max_seq_len=64)  # the entry it wrote
    assert d.train_tokens.ndim == 2 and d.train_tokens.size >= 5000
    assert f" {d.train_tokens.size:,} train / {d.val_tokens.size:,} val tokens" in proc.stdout, proc.stdout


def test_data_py_reports_bad_input_in_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "a.txt").write_text(make_text(300))
    proc = run_script("data.py", "--dataset", tmp_path / "a.txt", "--tokenizer", "char", "--max_tokens", 100,
                      "--max_seq_len", 64, "--cache_dir", tmp_path / "cache", timeout=120)
    assert_one_line_error(proc, "max_tokens 100", "--max_tokens 130")
    assert not (tmp_path / "cache").exists()
