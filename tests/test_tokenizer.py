"""Tests for tokenizer.py: char and BPE vocabularies, saved and local tokenizers, EOS, encode/decode.

The tokenizers are built through prepare_data, as a run builds them. Offline by construction:
HF_HUB_OFFLINE=1 is set before anything imports huggingface_hub, and every text is written
by the test into tmp_path.
"""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

from conftest import make_cfg, make_text
from data import prepare_data
from tokenizer import decode, encode, load_tokenizer, save_tokenizer


@pytest.mark.parametrize("kind", ["char", "bpe:300"])
def test_tokenizer_round_trip(tmp_path, kind):
    # the special characters go first: the vocabulary comes from the training text only,
    # and the end of a single file is validation
    (tmp_path / "a.txt").write_text("tabs\tand ünïcödé, — and!\r\nmore\n" + make_text(300))
    tok = prepare_data(make_cfg(tmp_path, tmp_path / "a.txt", kind), max_seq_len=16).tokenizer
    save_tokenizer(tok, tmp_path / "out")
    loaded = load_tokenizer(tmp_path / "out")
    sample = "L00001 the quick brown fox\n\n  jumps, over ünïcödé\ttabs!\n"
    assert encode(loaded, sample) == encode(tok, sample)
    assert decode(loaded, encode(loaded, sample)) == sample
    assert len(loaded) == len(tok) and loaded.eos_token_id == tok.eos_token_id
    assert loaded.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_char_tokenizer_maps_unseen_characters_to_unk(tmp_path):
    (tmp_path / "a.txt").write_text(make_text(200))
    tok = prepare_data(make_cfg(tmp_path, tmp_path / "a.txt"), max_seq_len=16).tokenizer
    assert encode(tok, "Zé") == [tok.unk_token_id] * 2  # make_text has neither


def test_local_tokenizer_folder(tmp_path):
    (tmp_path / "a.txt").write_text(make_text(300))
    first = prepare_data(make_cfg(tmp_path, tmp_path / "a.txt", "bpe:320"), max_seq_len=32)
    save_tokenizer(first.tokenizer, tmp_path / "tok")
    # a tokenizer.json that truncates (some hub ones do) must not cut documents short
    spec = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    d = prepare_data(make_cfg(tmp_path, tmp_path / "a.txt", str(tmp_path / "tok")), max_seq_len=32)
    assert d.source.endswith("+ tokenizer " + str(tmp_path / "tok"))
    assert d.vocab_size == first.vocab_size and d.eos_id == first.eos_id
    np.testing.assert_array_equal(d.train_tokens, first.train_tokens)


def test_tokenizer_without_eos_gets_one(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator([make_text(100)], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path / "noeos")
    (tmp_path / "a.txt").write_text(make_text(300))
    d = prepare_data(make_cfg(tmp_path, tmp_path / "a.txt", str(tmp_path / "noeos")), max_seq_len=32)
    assert d.tokenizer.eos_token == "<|endoftext|>" and d.eos_id == d.vocab_size - 1 == 300
    assert d.val_tokens[-1] == d.eos_id


def test_bpe_that_runs_out_of_merges_says_so(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(make_text(100))
    cfg = make_cfg(tmp_path, tmp_path / "a.txt", "bpe:2048")
    for run in ("built", "cached"):
        d = prepare_data(cfg, max_seq_len=16)
        assert 257 < d.vocab_size < 2048
        lines = [line for line in capsys.readouterr().out.splitlines() if "stopped at" in line]
        assert len(lines) == 1 and lines[0].startswith(f"data: bpe:2048 stopped at {d.vocab_size:,} tokens: "), lines
        assert "no more merges" in lines[0], lines
    prepare_data(cfg, max_seq_len=16, rank=1)  # only rank 0 speaks
    prepare_data(make_cfg(tmp_path, tmp_path / "a.txt", "bpe:300"), max_seq_len=16)  # a BPE that got its size
    assert "stopped at" not in capsys.readouterr().out
