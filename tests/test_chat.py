"""Talking to a chat model through inference.py: prompts as user turns, a multi-turn chat over a pipe."""

import io

import pytest

from chat import fit_history, stream_reply
from conftest import run_script
from inference import load_checkpoint
from tokenizer import render_prompt


@pytest.fixture(scope="module")
def chat_model(chat_run):
    return load_checkpoint(chat_run, "cpu", "fp32")


def reply_alone(model, tokenizer, messages, max_new_tokens=48, **kwargs):
    out = io.StringIO()
    thinking, answer, _, _ = stream_reply(model, tokenizer, messages, out, max_new_tokens=max_new_tokens, **kwargs)
    return out.getvalue(), thinking, answer


def test_a_multi_turn_chat_over_a_pipe_keeps_the_history_until_reset(chat_run, chat_model):
    model, tokenizer = chat_model
    first, second, n = "What is 12 + 9?", "What is 3 * 4?", 32  # n: short replies, so a history fits the context
    proc = run_script("inference.py", "--out_dir", chat_run, "--temperature", 0, "--max_new_tokens", n, "--dtype",
                      "fp32", input=f"{first}\n{second}\n/reset\n{second}\nquit\nWhat is 1 + 1?\n")
    assert proc.returncode == 0, proc.stderr
    turns = proc.stdout.split("you> ")[1:]
    assert len(turns) == 3 and "1 + 1" not in proc.stdout and "<|im_end|>" not in proc.stdout
    # each reply is the model's reply to the conversation so far (the answers, not the steps, stay in it)
    shown, _, answer = reply_alone(model, tokenizer, [{"role": "user", "content": first}], n)
    assert turns[0] == f"{first}\nassistant>\n{shown}"
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": answer},
               {"role": "user", "content": second}]
    assert len(render_prompt(tokenizer, history)) <= 128 - n  # the whole history fits beside the reply
    assert turns[1] == f"{second}\nassistant>\n{reply_alone(model, tokenizer, history, n)[0]}"
    assert turns[2] == f"{second}\nassistant>\n{reply_alone(model, tokenizer, history[2:], n)[0]}"  # after /reset
    assert "(history cleared)" in proc.stderr


def test_thinking_is_set_apart_and_can_be_hidden(chat_run, chat_model):
    model, tokenizer = chat_model
    shown, thinking, answer = reply_alone(model, tokenizer, [{"role": "user", "content": "What is 45 + 38?"}], 96)
    assert shown.startswith("(thinking)\n") and "(answer)\n" in shown
    if thinking:  # what the model wrote between <think> and </think>, without the tokens themselves
        assert thinking in shown and "<think>" not in shown
    terminal = io.StringIO()
    stream_reply(model, tokenizer, [{"role": "user", "content": "What is 45 + 38?"}], terminal, tty=True,
                 max_new_tokens=96)
    assert "(thinking)" not in terminal.getvalue() and ("\x1b[2m" in terminal.getvalue()) == bool(thinking)
    proc = run_script("inference.py", "--out_dir", chat_run, "--prompt", "What is 45 + 38?", "--temperature", 0,
                      "--max_new_tokens", 96, "--hide_thinking", "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("you> What is 45 + 38?\nassistant>\n")  # the answer alone: no section headers
    assert answer in proc.stdout and "(thinking)" not in proc.stdout and "(answer)" not in proc.stdout and (not thinking or thinking not in proc.stdout)


def test_prompts_file_is_one_conversation_per_line(chat_run, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is 1 + 2?\n\nWhat is 7 * 3?\n")
    proc = run_script("inference.py", "--out_dir", chat_run, "--prompts_file", prompts, "--max_new_tokens", 40,
                      "--seed", 0)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("you> ") == 2 and proc.stdout.count("-" * 40) == 1


def test_history_that_outgrows_the_context_drops_the_oldest_turns(chat_model):
    _, tokenizer = chat_model
    system = {"role": "system", "content": "Answer with numbers."}
    turns = [{"role": r, "content": f"{r} message number {i}"} for i in range(6) for r in ("user", "assistant")]
    history = [system] + turns + [{"role": "user", "content": "the newest question"}]
    budget = len(render_prompt(tokenizer, [system] + turns[-4:] + history[-1:]))
    kept = fit_history(tokenizer, history, budget)
    assert kept[0] == system and kept[-1] == history[-1] and kept[1]["role"] == "user"
    assert kept[1:] == history[-len(kept) + 1:] and len(kept) < len(history)
    assert len(render_prompt(tokenizer, kept)) <= budget
    assert fit_history(tokenizer, history[-1:], 1) == history[-1:]  # the newest turn always stays
