"""Tests for sources.py: local files and folders, table files, the embedded corpus, the hub probe.

The sources are read through prepare_data, as a run reads them. Offline by construction:
HF_HUB_OFFLINE=1 is set before anything imports huggingface_hub, and every text is written
by the test into tmp_path.
"""

import json
import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import pandas as pd
import pytest

import sources
from conftest import documents, make_cfg, make_text
from data import prepare_data
from sources import clean_play, shakespeare_files
from tokenizer import decode, encode


def test_folder_of_txt_files_bpe(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    texts = [make_text(120, seed=i, tag=f"F{i}") for i in range(4)]
    for i, text in enumerate(texts):
        (folder / f"part{i}.txt").write_text(text)
    (folder / "README.md").write_text("not text data")  # other file types in a folder are ignored
    d = prepare_data(make_cfg(tmp_path, folder, "bpe:300", val_fraction=0.25), max_seq_len=32)
    assert d.source == "corpus (4 files) + bpe:300" and d.vocab_size <= 300
    assert documents(d) == texts  # one document per file, each ending with EOS
    assert decode(d.tokenizer, d.val_tokens) == texts[-1]  # one in four documents: the 4th


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_table_files(tmp_path, suffix):
    rows = [{"id": i, "text": make_text(6, seed=i, tag=f"R{i}")} for i in range(50)]
    path = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    # byte-level: the digit 9 is only in held-out rows, so a char vocabulary would not know it
    d = prepare_data(make_cfg(tmp_path, path, "bpe:300", val_fraction=0.1), max_seq_len=16)
    held_out = rows[9::10]  # one in ten documents, the 10th, 20th, ... as they stream
    assert documents(d) == [r["text"] for r in rows if r not in held_out] + [r["text"] for r in held_out]
    assert decode(d.tokenizer, d.val_tokens) == "".join(r["text"] for r in held_out)
    assert d.val_source.startswith("10% of documents, held out as they stream (5 of 50, ")


def test_own_validation_split_and_text_column(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    train = [make_text(8, seed=i, tag="T") for i in range(20)]
    val = [make_text(8, seed=100 + i, tag="V") for i in range(3)]  # 'V' only in validation
    (folder / "train.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in train))
    (folder / "validation.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in val))
    d = prepare_data(make_cfg(tmp_path, folder, text_column="body"), max_seq_len=16)
    assert decode(d.tokenizer, d.train_tokens) == "".join(train)
    # the vocabulary comes from the training split only: 'V' is unknown
    assert encode(d.tokenizer, "V") == [d.tokenizer.unk_token_id]
    assert decode(d.tokenizer, d.val_tokens) == "".join(val).replace("V", "")


def test_embedded_corpus_is_clean_text(tmp_path):
    plays = [clean_play(f.read_text(encoding="utf-8")) for f in shakespeare_files()]
    assert len(plays) >= 36
    text = "".join(plays)
    assert len(text) > 4_000_000
    for markup in ("**", "#", "_", "  \n", "\\[", "\n\n\n"):
        assert markup not in text, markup
    assert "ROMEO:\n" in text and "To be, or not to be" in text and "Othello\n\nACT I\n" in text
    d = prepare_data(make_cfg(tmp_path, "shakespeare", max_tokens=20_000), max_seq_len=64)
    assert d.source.startswith("shakespeare (embedded, ") and d.sample_prompt == "ROMEO:"
    assert len(d.train_tokens) + len(d.val_tokens) == 20_000
    assert encode(d.tokenizer, "ROMEO:") != []


def test_hub_probe_answers_quickly(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    start = time.perf_counter()
    sources._probe_hub.__wrapped__()  # reachable or not, it must not hang
    assert time.perf_counter() - start < 5


def test_table_files_print_no_progress_bars(tmp_path, capfd):
    import datasets
    datasets.enable_progress_bars()  # as in a fresh process: prepare_data must silence them itself
    datasets.logging.set_verbosity_warning()
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": make_text(6, seed=i)}) + "\n" for i in range(50)))
    prepare_data(make_cfg(tmp_path, tmp_path / "rows.jsonl"), max_seq_len=16)
    out, err = capfd.readouterr()
    for bar in ("Generating train split", "Map", "examples/s", "it/s", "%|"):
        assert bar not in out + err, out + err
    assert not err.strip() and all(line.startswith("data: ") for line in out.splitlines()), out + err


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_iter_rows_streams_the_rows_of_a_split(tmp_path, suffix):
    """The public row stream (what conversation data reads): rows as dicts, file by file, per split."""
    folder = tmp_path / "chats"
    folder.mkdir()

    def chat(i):
        return {"id": i, "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}

    parts = {"train-00000": [chat(i) for i in range(3)], "train-00001": [chat(i) for i in range(3, 5)],
             "validation": [chat(9)]}
    for name, rows in parts.items():
        path = folder / f"{name}{suffix}"
        if suffix == ".jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            pd.DataFrame(rows).to_parquet(path)
    cfg = make_cfg(tmp_path, folder)
    source = sources.open_source(str(folder), cfg.cache_dir, cfg.text_column)
    assert source.splits() == ("train", "validation")
    assert list(source.iter_rows("train", columns=["messages"])) == \
        [{"messages": r["messages"]} for r in parts["train-00000"] + parts["train-00001"]]
    assert list(sources.iter_rows(str(folder), cfg.cache_dir, "validation")) == parts["validation"]
    with pytest.raises(sources.DataError) as e:
        list(source.iter_rows("train", columns=["conversation"]))
    assert "no column 'conversation'" in str(e.value) and f"train-00000{suffix}" in str(e.value)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.suffix == ".arrow"]  # streamed, not converted
