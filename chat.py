"""Talking to a chat model (one trained on conversations): streamed replies with the thinking set apart,
and a multi-turn session whose history is kept, cut to fit the context, and cleared with /reset.

    python inference.py --out_dir out                      # a chat model: a multi-turn chat
    python inference.py --out_dir out --prompt "What is 12 + 9?" [--hide_thinking]

On a terminal the steps are shown dim before the answer; in a pipe they come under a "(thinking)"
line, and the answer under "(answer)". A reply is sampled by the engine (engine.sample, with an
engine.SamplingParams) and made text by engine.TextStream; `prompt_lines` reads what is typed, for
inference.py's interactive prompt too.
"""

import dataclasses
import sys
import time

from engine import SamplingParams, TextStream, sample
from tokenizer import IM_END, render_prompt

DIM, PLAIN = "\x1b[2m", "\x1b[0m"
REPLY = SamplingParams(temperature=0.0)  # stream_reply's settings unless told otherwise: greedy, 256 tokens


def stream_reply(model, tokenizer, messages: list, out=None, show_thinking: bool = True, tty: bool = False,
                 params: SamplingParams = REPLY, seed: int | None = None, **settings) -> tuple:
    """Print the assistant's reply to `messages` as it is generated; returns (thinking, answer, tokens, seconds).

    Generation stops at the end of the turn (IM_END joins params.stop_ids). `settings` replace fields of `params`
    (stream_reply(..., max_new_tokens=48)). A section starts with a "(thinking)" or "(answer)" line in a pipe
    (none when the thinking is hidden: the answer is all there is); on a terminal the thinking is dim instead."""
    out = out or sys.stdout
    end_turn = tokenizer.convert_tokens_to_ids(IM_END)
    params = dataclasses.replace(params, stop_ids=params.stop_ids + (end_turn,), **settings)
    text, n, start = TextStream(tokenizer, chat=True), 0, time.perf_counter()

    def show(pieces):
        for part, piece in pieces:
            if part == "answer" or show_thinking:
                if not piece:  # a section starts: its header, in a pipe, and only when both sections show
                    piece = "" if tty or not show_thinking else f"({part})\n"
                out.write(f"{DIM}{piece}{PLAIN}" if tty and part == "thinking" and piece else piece)
                out.flush()

    for n, token in enumerate(sample(model, render_prompt(tokenizer, messages), params, seed), 1):
        show(text.feed(token))
    show(text.finish())
    out.write("\n")
    out.flush()
    return text.texts["thinking"].strip("\n"), text.texts["answer"].strip("\n"), n, time.perf_counter() - start


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


def prompt_lines(prompt: str, hint: str):
    """The lines typed (or piped in) until quit, exit, Ctrl-D or Ctrl-C at the prompt; blank ones are skipped.
    On a terminal, `hint` comes first and `prompt` before each line."""
    tty = sys.stdin.isatty()
    if tty:
        print(hint, file=sys.stderr)
    while True:
        try:
            line = input(prompt if tty else "")
        except (EOFError, KeyboardInterrupt):
            if tty:
                print(file=sys.stderr)  # leave the shell's prompt on a line of its own
            return
        if line.strip() in ("quit", "exit"):
            return
        if line.strip():
            yield line


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
        # keep room for the reply: up to half the context (a longer reply slides the window, see engine.Engine)
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
    return stream_reply(model, tokenizer, messages, out, show_thinking, tty, SamplingParams.from_config(settings),
                        settings.seed)
