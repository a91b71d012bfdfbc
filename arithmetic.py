"""The built-in `arithmetic` conversations (`--dataset arithmetic`): multi-step problems whose assistant
turns carry short numbered steps in `thinking` and the bare answer in `content`. Offline and seeded.

    What is 4735 + 2890?    thinking: 1. 5+0=5                  content: 7625
                                      2. 3+9=12, carry 1
                                      3. 7+8+1=16, carry 1
                                      4. 4+2+1=7

Two kinds at graded difficulty (the level is the number of digits of the first number): addition,
each step one column, right to left, with its carry; and multiplication. About a tenth of all
problems is held out (a fixed hash of the problem decides), so the problems that measure answer
accuracy never appear in training, whatever the seed.

Difficulties (`--dataset arithmetic:NAME`; `arithmetic` is `arithmetic:basic`):
    basic   two numbers of 1 to 5 digits added; a 1- to 5-digit number times one digit, column by column
    hard    more digits, several operands, multi-digit products: three numbers of 3 to 7 digits added
            (carries up to 2); a 2- to 4-digit number times a 2-digit one, one step per partial product
            (347 * 25: 1. 347*5=1735, 2. 347*20=6940, 3. 1735+6940=8675), each done in one go
    terse   the hard problems, but only 3 training replies in 10 show their steps: the others do the whole problem
            in one step (1. 347*25=8675), as terse worked solutions do. Fine-tuned on them, a model imitates the
            shortcut and gets most answers wrong; RL (run_rl.py) can learn that working in steps pays
"""

import random
import zlib
from dataclasses import dataclass

BUILTIN = "arithmetic"
KINDS = ("add", "mul")
LEVELS = (1, 2, 3, 4, 5)  # the basic difficulty's
SYMBOL = {"add": "+", "mul": "*"}
HELD_OUT = 10  # one problem in HELD_OUT is held out


@dataclass(frozen=True)
class Difficulty:
    add_levels: tuple  # digits of the numbers added
    mul_levels: tuple  # digits of the number multiplied
    operands: int  # numbers added
    multiplier: int  # digits of the second factor (1: a digit from 2 to 9)
    worked: float = 1.0  # share of the training replies that show their steps (the rest: one step, in one go)


DIFFICULTIES = {"basic": Difficulty(LEVELS, LEVELS, operands=2, multiplier=1),
                "hard": Difficulty((3, 4, 5, 6, 7), (2, 3, 4), operands=3, multiplier=2),
                "terse": Difficulty((3, 4, 5, 6, 7), (2, 3, 4), operands=3, multiplier=2, worked=0.3)}


def difficulty_of(dataset: str) -> str | None:
    """`arithmetic` -> "basic", `arithmetic:NAME` -> NAME, anything else (not the built-in set) -> None;
    ValueError (one line) for a difficulty that does not exist."""
    name, _, level = dataset.partition(":")
    if name != BUILTIN:
        return None
    level = level or "basic"
    if level not in DIFFICULTIES:
        raise ValueError(f"dataset {dataset!r}: no such difficulty; use "
                         f"{', '.join(f'{BUILTIN}:{d}' for d in DIFFICULTIES)}")
    return level


def answer(kind: str, *numbers: int) -> int:
    if kind == "add":
        return sum(numbers)
    a, b = numbers
    return a * b


def steps(kind: str, *numbers: int) -> list:
    """The steps, numbered: columns right to left with the digits, the carry in, their result and the carry
    out (additions, and products by one digit), or one step per partial product and one for their sum."""
    if kind == "mul" and numbers[1] >= 10:
        return product_steps(*numbers)
    out, carry = [], 0
    if kind == "add":
        digits = [str(n)[::-1] for n in numbers]
        width = max(map(len, digits))
        columns = [("+".join(d[i] if i < len(d) else "0" for d in digits), sum(int(d[i]) for d in digits if i < len(d)))
                   for i in range(width)]
    else:  # a times the single digit b
        a, b = numbers
        columns = [(f"{d}*{b}", int(d) * b) for d in str(a)[::-1]]
    for i, (expr, value) in enumerate(columns):
        total = value + carry
        line = f"{i + 1}. {expr}{f'+{carry}' if carry else ''}={total}"
        carry = total // 10
        out.append(line + (f", carry {carry}" if carry and i < len(columns) - 1 else ""))
    return out


def product_steps(a: int, b: int) -> list:
    """a times a multi-digit b: a times each digit of b in its place, then the sum of those partial products."""
    partials = [(f"{a}*{d}{'0' * i}", a * int(d) * 10 ** i) for i, d in enumerate(str(b)[::-1])]
    lines = [f"{i + 1}. {expr}={value}" for i, (expr, value) in enumerate(partials)]
    return lines + [f"{len(lines) + 1}. {'+'.join(str(v) for _, v in partials)}={a * b}"]


def is_held_out(kind: str, *numbers: int) -> bool:
    return zlib.crc32(f"{kind} {' '.join(map(str, numbers))}".encode()) % HELD_OUT == 0


def conversation(kind: str, *numbers: int, worked: bool = True) -> dict:
    """One problem as a conversation row: {"messages": [user, assistant]} plus what checking it needs; the reply
    shows its steps, or (`worked` False) does the whole problem in one step."""
    result = str(answer(kind, *numbers))
    thinking = steps(kind, *numbers) if worked else [f"1. {SYMBOL[kind].join(map(str, numbers))}={result}"]
    return {"messages": [{"role": "user", "content": f"What is {f' {SYMBOL[kind]} '.join(map(str, numbers))}?"},
                         {"role": "assistant", "thinking": "\n".join(thinking), "content": result}],
            "kind": kind, "level": len(str(numbers[0])), "answer": result}


def draw(rng: random.Random, kind: str, level: int, difficulty: Difficulty) -> tuple:
    """The numbers of one problem: `level` digits each (the second factor: difficulty.multiplier digits)."""
    def number(digits):
        return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)
    if kind == "add":
        return tuple(number(level) for _ in range(difficulty.operands))
    return number(level), rng.randint(2, 9) if difficulty.multiplier == 1 else number(difficulty.multiplier)


def problems(n: int, seed: int, held_out: bool, difficulty: str = "basic") -> list:
    """n conversations, kinds and levels in turn (every level equally often), drawn with `seed` from the
    held-out problems or from the others. Levels too small to hold enough distinct problems repeat. Training
    replies show their steps with the difficulty's `worked` chance (held-out ones always do)."""
    rng, spec = random.Random(seed), DIFFICULTIES[difficulty]
    shows_steps = random.Random(f"{seed} worked")  # its own draws: the problems are the same whatever `worked` is
    levels = {"add": spec.add_levels, "mul": spec.mul_levels}
    out = []
    while len(out) < n:
        kind = KINDS[len(out) % len(KINDS)]
        level = levels[kind][len(out) // len(KINDS) % len(levels[kind])]
        while True:
            numbers = draw(rng, kind, level, spec)
            if is_held_out(kind, *numbers) == held_out:
                break
        out.append(conversation(kind, *numbers, worked=held_out or shows_steps.random() < spec.worked))
    return out


def check(reply_answer: str, row: dict) -> bool:
    """Exact match of a reply's answer (its content, without the steps) with the row's answer."""
    return reply_answer.strip() == row["answer"]
