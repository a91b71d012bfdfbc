"""Talking to a chat model (one trained on conversations): streamed replies with the thinking set apart,
and a multi-turn session whose history is kept, cut to fit the context, and cleared with /reset.

    python inference.py --out_dir out                      # a chat model: a multi-turn chat
    python inference.py --out_dir out --prompt "What is 12 + 9?" [--hide_thinking]

On a terminal the steps are shown dim before the answer; in a pipe they come under a "(thinking)"
line, and the answer under "(answer)".
"""

import sys
import time

from inference import generate, prompt_lines
from tokenizer import END_THINK, IM_END, THINK, render_prompt

DIM, PLAIN = "\x1b[2m", "\x1b[0m"


def stream_reply(model, tokenizer, messages: list, out=None, show_thinking: bool = True, tty: bool = False,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = 50,
                 top_p: float | None = 0.9, repetition_penalty: float = 1.0, seed: int | None = None) -> tuple:
    """Print the assistant's reply to `messages` as it is generated; returns (thinking, answer, tokens, seconds).

    Generation stops at the end of the turn. Each part (thinking, answer) is decoded whole as it grows and
    only its new text is printed, so a multi-byte character split over tokens never shows half."""
    out = out or sys.stdout
    think, end_think, end_turn = (tokenizer.convert_tokens_to_ids(t) for t in (THINK, END_THINK, IM_END))
    parts = {"thinking": [], "answer": []}
    part, printed, start = "answer", 0, time.perf_counter()

    def show(text):
        if part == "answer" or show_thinking:
            out.write(f"{DIM}{text}{PLAIN}" if tty and part == "thinking" else text)
            out.flush()

    n = 0
    for n, token in enumerate(generate(model, render_prompt(tokenizer, messages), max_new_tokens, temperature, top_k,
                                       top_p, repetition_penalty, eos_id=end_turn, seed=seed), 1):
        if token in (think, end_think):  # a section starts: headers in a pipe, nothing on a terminal
            part, printed = ("thinking" if token == think else "answer"), 0
            show("" if tty else f"({part})\n")
            continue
        if token == end_turn:
            break
        parts[part].append(token)
        text = tokenizer.decode(parts[part], skip_special_tokens=True).lstrip("\n")
        if not text.endswith("\ufffd"):
            show(text[printed:])
            printed = len(text)
    out.write("\n")
    out.flush()
    thinking, answer = (tokenizer.decode(parts[p], skip_special_tokens=True).strip("\n") for p in parts)
    return thinking, answer, n, time.perf_counter() - start


def fit_history(tokenizer, messages: list, budget: int) -> list:
    """The most recent turns whose prompt fits `budget` tokens: the oldest turns go first (a system message
    stays); the newest user turn is always kept."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while len(turns) > 1 and len(render_prompt(tokenizer, system + turns)) > budget:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":  # start at a user turn
            turns = turns[1:]
    return system + turns


def chat_session(model, tokenizer, settings, show_thinking: bool = True, verbose: bool = False):
    """Multi-turn chat until quit, exit, Ctrl-D or Ctrl-C at the prompt. /reset clears the history; Ctrl-C
    during a reply stops it. Piped input is echoed, typed input is not."""
    tty = sys.stdin.isatty()
    history = []
    for line in prompt_lines("you> ", "chat: type a message and press enter; /reset clears the history; Ctrl-C stops "
                                      "a reply; quit, exit or Ctrl-D ends"):
        if line.strip() == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        if not tty:
            print(f"you> {line}")
        # keep room for the reply: up to half the context (a longer reply slides the window, see inference.engine)
        budget = model.cfg.max_seq_len - min(settings.max_new_tokens, model.cfg.max_seq_len // 2)
        history = fit_history(tokenizer, history + [{"role": "user", "content": line}], budget)
        try:
            _, answer, n, seconds = reply(model, tokenizer, history, settings, show_thinking, tty)
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
            history = history[:-1]
            continue
        history.append({"role": "assistant", "content": answer})  # steps stay out of the history, as in Qwen3
        if verbose:
            print(f"[{n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s]", file=sys.stderr)


def reply(model, tokenizer, messages, settings, show_thinking=True, tty=False, out=None):
    """stream_reply with the CLI's sampling settings (a config.SampleConfig)."""
    if not tty:
        (out or sys.stdout).write("assistant>\n")
    return stream_reply(model, tokenizer, messages, out, show_thinking, tty, settings.max_new_tokens,
                        settings.temperature, settings.top_k, settings.top_p, settings.repetition_penalty,
                        settings.seed)
