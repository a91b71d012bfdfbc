"""The built-in `arithmetic` conversations (`--dataset arithmetic`): multi-step problems whose assistant
turns carry short numbered steps in `thinking` and the bare answer in `content`. Offline and seeded.

    What is 4735 + 2890?    thinking: 1. 5+0=5                  content: 7625
                                      2. 3+9=12, carry 1
                                      3. 7+8+1=16, carry 1
                                      4. 4+2+1=7

Two kinds at graded difficulty (the level is the number of digits): addition of two level-digit
numbers, and a level-digit number times one digit. Each step is one column, right to left, with its
carry. About a tenth of all problems is held out (a fixed hash of the problem decides), so the
problems that measure answer accuracy never appear in training, whatever the seed.
"""

import random
import zlib

KINDS = ("add", "mul")
LEVELS = (1, 2, 3, 4, 5)
SYMBOL = {"add": "+", "mul": "*"}
HELD_OUT = 10  # one problem in HELD_OUT is held out


def answer(kind: str, a: int, b: int) -> int:
    return a + b if kind == "add" else a * b


def steps(kind: str, a: int, b: int) -> list:
    """The column steps, right to left: the digits, the carry in, their result, and the carry out."""
    out, carry = [], 0
    if kind == "add":
        da, db = str(a)[::-1], str(b)[::-1]
        columns = [(f"{da[i] if i < len(da) else 0}+{db[i] if i < len(db) else 0}",
                    int(da[i] if i < len(da) else 0) + int(db[i] if i < len(db) else 0))
                   for i in range(max(len(da), len(db)))]
    else:  # a times the single digit b
        columns = [(f"{d}*{b}", int(d) * b) for d in str(a)[::-1]]
    for i, (expr, value) in enumerate(columns):
        total = value + carry
        line = f"{i + 1}. {expr}{f'+{carry}' if carry else ''}={total}"
        carry = total // 10
        out.append(line + (f", carry {carry}" if carry and i < len(columns) - 1 else ""))
    return out


def is_held_out(kind: str, a: int, b: int) -> bool:
    return zlib.crc32(f"{kind} {a} {b}".encode()) % HELD_OUT == 0


def conversation(kind: str, a: int, b: int) -> dict:
    """One problem as a conversation row: {"messages": [user, assistant]} plus what checking it needs."""
    return {"messages": [{"role": "user", "content": f"What is {a} {SYMBOL[kind]} {b}?"},
                         {"role": "assistant", "thinking": "\n".join(steps(kind, a, b)),
                          "content": str(answer(kind, a, b))}],
            "kind": kind, "level": len(str(a)), "answer": str(answer(kind, a, b))}


def problems(n: int, seed: int, held_out: bool) -> list:
    """n conversations, kinds and levels in turn (every level equally often), drawn with `seed` from the
    held-out problems or from the others. Levels too small to hold enough distinct problems repeat."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        kind, level = KINDS[len(out) % len(KINDS)], LEVELS[len(out) // len(KINDS) % len(LEVELS)]
        while True:
            a = rng.randint(10 ** (level - 1) if level > 1 else 0, 10 ** level - 1)
            b = rng.randint(10 ** (level - 1) if level > 1 else 0, 10 ** level - 1) if kind == "add" else rng.randint(2, 9)
            if is_held_out(kind, a, b) == held_out:
                break
        out.append(conversation(kind, a, b))
    return out


def check(reply_answer: str, row: dict) -> bool:
    """Exact match of a reply's answer (its content, without the steps) with the row's answer."""
    return reply_answer.strip() == row["answer"]
