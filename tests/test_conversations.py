"""Conversations: the chat format, the loss mask, packing, the built-in arithmetic set, bad rows."""

import json
import re

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import arithmetic
from conftest import make_cfg, make_text, one_line_error, stand_in_hub
from conversations import check_messages, pack
from data import prepare_data
from sources import DataError
from tokenizer import CHAT_TOKENS, IM_END, add_chat_format, build_tokenizer, render_conversation, render_prompt

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 47 + 35?"},
                {"role": "assistant", "thinking": "1. 7+5=12, carry 1\n2. 4+3+1=8", "content": "82"},
                {"role": "user", "content": "And 82 * 2?"},
                {"role": "assistant", "content": "164"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def assistant_parts(messages):
    """What the assistant writes, as the chat format renders it: the tokens that carry a loss."""
    return "".join((f"<think>\n{m['thinking']}\n</think>\n" if m.get("thinking") else "") + m["content"] + IM_END
                   for m in messages if m["role"] == "assistant")


@pytest.mark.parametrize("kind", ["char", "bpe:300"])
def test_mask_covers_exactly_what_the_assistant_writes(kind):
    tok = build_tokenizer(*(("char", 0) if kind == "char" else ("bpe", 300)),
                          iter([make_text(200) + json.dumps(CONVERSATION)]))
    assert add_chat_format(tok) == len(CHAT_TOKENS)
    ids, mask = render_conversation(tok, CONVERSATION)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == assistant_parts(CONVERSATION)
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    prompt = render_prompt(tok, CONVERSATION[:2])
    assert ids[:len(prompt)] == prompt and tok.decode(ids[len(prompt):]).startswith("<think>")  # the reply follows


def test_saved_tokenizer_renders_what_training_rendered(tmp_path):
    """AutoTokenizer on the run's saved tokenizer: apply_chat_template gives, token for token, the ids that
    training packed, and with add_generation_prompt exactly the prefix a reply follows."""
    rows = [{"messages": CONVERSATION}] + [{"messages": [{"role": "user", "content": f"q{i}"},
                                                         {"role": "assistant", "content": f"a{i}"}]} for i in range(9)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    for spec in ("char", "bpe:300"):
        d = prepare_data(make_cfg(tmp_path, path, spec, val_fraction=0.2), max_seq_len=200)
        d.tokenizer.save_pretrained(tmp_path / spec)
        loaded = AutoTokenizer.from_pretrained(tmp_path / spec)
        expected = loaded.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
        packed = [row.tolist() for row in d.train_tokens]
        assert any(row[i:i + len(expected)] == expected for row in packed for i in range(len(row)))
        prompt = loaded.apply_chat_template(CONVERSATION[:4], add_generation_prompt=True, return_dict=True)["input_ids"]
        assert prompt == render_prompt(d.tokenizer, CONVERSATION[:4]) == expected[:len(prompt)]


def test_packing_keeps_conversations_whole_and_cuts_or_drops_long_ones():
    tok = build_tokenizer("char", 0, iter([json.dumps(CONVERSATION) + "abcdefghijklmnopqrstuvwxyz"]))
    add_chat_format(tok)
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 100}]
    long_question = [{"role": "user", "content": "y" * 100}, {"role": "assistant", "content": "ok"}]
    n_short = len(render_conversation(tok, short)[0])
    tokens, mask, counts = pack(tok, [short, short, short, long_answer, long_question, short], 2 * n_short + 3)
    assert counts == {"packed": 5, "truncated": 1, "dropped": 1}
    assert tokens.shape == (4, 2 * n_short + 3)
    assert tok.decode(tokens[0]).count("<|im_start|>user") == 2  # two whole conversations, then padding
    assert not mask[0, 2 * n_short:].any() and (tokens[0, 2 * n_short:] == tok.eos_token_id).all()
    assert mask[2].all() == False and mask[2].any()  # the cut one keeps the start of its answer


def test_batches_put_the_loss_on_assistant_tokens_only(tmp_path):
    d = prepare_data(make_cfg(tmp_path, "arithmetic", max_tokens=30_000), max_seq_len=96)
    x, y = next(d.eval_batches(16, 96))
    assert x.shape == y.shape == (16, 96)
    for tokens, row_x, row_y in zip(d.val_tokens, x.tolist(), y.tolist()):
        assert row_x == tokens[:-1].tolist()
        window = d.tokenizer.decode(tokens.tolist(), skip_special_tokens=False)
        replies = re.findall(r"<\|im_start\|>assistant\n(.*?(?:<\|im_end\|>|$))", window, flags=re.S)
        scored = d.tokenizer.decode([t for t in row_y if t != -100], skip_special_tokens=False)
        assert replies and scored == "".join(replies)  # the steps, the answers and their end of turn; nothing else
    train_x, train_y = d.batches(8, 96, seed=0).next_batch()
    scored = train_y != -100
    assert torch.equal(train_y[:, :-1][scored[:, :-1]], train_x[:, 1:][scored[:, :-1]])  # targets are the next tokens
    assert 0.2 < scored.float().mean() < 0.8 and (~scored).any(1).all()


def test_thinking_false_trains_on_the_same_answers_without_steps(tmp_path):
    steps = prepare_data(make_cfg(tmp_path, "arithmetic", max_tokens=20_000), max_seq_len=128)
    answers = prepare_data(make_cfg(tmp_path, "arithmetic", max_tokens=20_000, thinking=False), max_seq_len=128)
    text = answers.tokenizer.decode(answers.train_tokens[:4].ravel().tolist(), skip_special_tokens=False)
    assert "<think>" not in text and "carry" not in text and "What is" in text
    assert "<think>" in steps.tokenizer.decode(steps.train_tokens[0].tolist(), skip_special_tokens=False)
    assert answers.source.endswith("answers only") and answers.answer_rows == steps.answer_rows


def test_arithmetic_steps_are_right_and_held_out_problems_never_train():
    rows = arithmetic.problems(400, seed=3, held_out=False)
    held = arithmetic.problems(200, seed=4, held_out=True)
    assert arithmetic.problems(400, seed=3, held_out=False) == rows  # seeded
    for row in rows + held:
        question, reply = row["messages"][0]["content"], row["messages"][1]
        a, op, b = re.fullmatch(r"What is (\d+) ([+*]) (\d+)\?", question).groups()
        assert int(reply["content"]) == (int(a) + int(b) if op == "+" else int(a) * int(b)) == int(row["answer"])
        lines = reply["thinking"].split("\n")
        assert len(lines) == len(a) and all(line.startswith(f"{i + 1}. ") for i, line in enumerate(lines))
        for line in lines:  # every step's arithmetic holds
            expr, total = re.match(r"\d+\. ([\d+*]+)=(\d+)", line).groups()
            assert eval(expr) == int(total)
    key = lambda r: r["messages"][0]["content"]
    assert not {key(r) for r in rows} & {key(r) for r in held}
    assert {(r["kind"], r["level"]) for r in held} == {(k, lv) for k in arithmetic.KINDS for lv in arithmetic.LEVELS}
    assert arithmetic.steps("add", 4735, 2890) == ["1. 5+0=5", "2. 3+9=12, carry 1", "3. 7+8+1=16, carry 1",
                                                   "4. 4+2+1=7"]


def test_reasoning_content_and_a_folders_own_validation_split(tmp_path):
    folder = tmp_path / "chats"
    folder.mkdir()
    turn = lambda i: {"messages": [{"role": "user", "content": f"hi {i}"},
                                   {"role": "assistant", "reasoning_content": f"think {i}", "content": f"ok {i}"}]}
    write_jsonl(folder / "train.jsonl", [turn(i) for i in range(20)])
    write_jsonl(folder / "validation.jsonl", [turn(100 + i) for i in range(3)])
    d = prepare_data(make_cfg(tmp_path, folder), max_seq_len=64)
    assert "own validation split (3 conversations" in d.val_source
    val = d.tokenizer.decode(d.val_tokens.ravel().tolist(), skip_special_tokens=False)
    assert "<think>\nthink 100\n</think>\nok 100" in val and "hi 5" not in val


def test_parquet_conversations(tmp_path):
    import pandas as pd
    rows = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(10)]
    pd.DataFrame({"messages": rows}).to_parquet(tmp_path / "c.parquet")
    d = prepare_data(make_cfg(tmp_path, tmp_path / "c.parquet", val_fraction=0.2), max_seq_len=64)
    assert d.chat and "last 20% of conversations" in d.val_source


def test_hub_conversations_with_a_stand_in_hub_then_offline(tmp_path, monkeypatch):
    """The hub path is the real one (datasets streaming); a stand-in hub resolves the id to local files."""
    import datasets
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(12)]
    hub = tmp_path / "hub"
    hub.mkdir()
    write_jsonl(hub / "train.jsonl", rows)
    stand_in_hub(monkeypatch, {"someone/chats": hub})
    first = prepare_data(make_cfg(tmp_path, "someone/chats", val_fraction=0.25), max_seq_len=32)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a second run needs no network
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda *a, **k: 1 / 0)
    again = prepare_data(make_cfg(tmp_path, "someone/chats", val_fraction=0.25), max_seq_len=32)
    assert first.chat and again.chat and np.array_equal(first.train_tokens, again.train_tokens)


@pytest.mark.parametrize("messages, needle", [
    ("hello", "must be a list"),
    ([], "is empty"),
    ([{"role": "robot", "content": "hi"}], "role 'robot'"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "thinking": ["a", "b"]}],
     "thinking field that is not text"),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": "ok"}], "no text content"),
])
def test_bad_conversations_are_one_line_errors(messages, needle):
    with pytest.raises(DataError, match=needle) as e:
        check_messages(messages, "chats.jsonl, train row 7")
    assert "\n" not in str(e.value) and "row 7" in str(e.value)


def test_bad_rows_in_a_file_stop_the_run_with_one_line(tmp_path):
    from conftest import assert_one_line_error, run_script
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "ok"}]},
                                                {"messages": [{"role": "wizard", "content": "hi"}]}])
    proc = run_script("run_train.py", "--dataset", path, "--tokenizer", "char", "--cache_dir", tmp_path / "cache",
                      "--out_dir", tmp_path / "out", "--max_steps", 2, timeout=120)
    assert_one_line_error(proc, "bad.jsonl, line 2", "wizard")  # the second line of the file
    assert not (tmp_path / "out").exists()


def test_a_bad_row_is_named_by_its_line_in_its_file(tmp_path):
    """Lines counted from 1 in the file that holds the row, as an editor shows them (a JSONL error once named
    the third line of the file "row 2"); a Parquet row by its row, also from 1."""
    import pandas as pd
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    bad = {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    write_jsonl(tmp_path / "one.jsonl", [good, good, bad])
    pd.DataFrame([good, good, bad]).to_parquet(tmp_path / "one.parquet")
    folder = tmp_path / "chats"
    folder.mkdir()
    write_jsonl(folder / "train-00000.jsonl", [good] * 3)
    write_jsonl(folder / "train-00001.jsonl", [good, bad])
    cases = [(tmp_path / "one.jsonl", "one.jsonl, line 3"), (tmp_path / "one.parquet", "one.parquet, row 3"),
             (folder, "train-00001.jsonl, line 2")]
    for dataset, where in cases:
        with pytest.raises(DataError) as e:
            prepare_data(make_cfg(tmp_path, dataset), max_seq_len=64)
        one_line_error(e, where, "role 'wizard'")


def test_a_tokenizer_folder_gets_the_chat_format(tmp_path):
    """A hub or local tokenizer (AutoTokenizer) is used as it is, plus the chat tokens it lacks."""
    base = build_tokenizer("bpe", 300, iter([make_text(300) + "What is 1 + 2? carry"]))
    base.save_pretrained(tmp_path / "tok")
    d = prepare_data(make_cfg(tmp_path, "arithmetic", str(tmp_path / "tok"), max_tokens=5_000), max_seq_len=128)
    assert d.vocab_size == len(base) + len(CHAT_TOKENS)
    assert d.tokenizer.convert_ids_to_tokens(d.train_tokens[0][:1].tolist()) == ["<|im_start|>"]
