"""What run_rl.py learns from: problems with checkable answers, and the reward of a completion.

    train, held_out, name = load_problems("arithmetic:hard", seed=1337, eval_answers=100, cache_dir="data_cache")
    reward(problem, completion)      # 1.0 when the completion's final answer is the problem's answer, else 0.0
    reward_fn = load_reward("my_rewards:partial_credit")   # --reward: a function of your own, same signature

A problem is {"messages": the conversation up to the assistant's reply, "answer": the expected final answer}
(the built-in set's rows keep their kind and level). A completion is the assistant's reply as sampled, its
special tokens kept (`<think>...</think>` then the answer, then `<|im_end|>`); its final answer is the text
after the thinking section (tokenizer.split_reply). Problems come from:
    - the built-in arithmetic set (`arithmetic`, `arithmetic:hard`, `arithmetic:terse`): the training problems
      fine-tuning draws from, and held-out problems (never in training) for evaluation;
    - a local or hub table with `question` and `answer` columns (GSM8K: the final answer follows `####`);
    - conversations (a `messages` column) whose last assistant turn is the answer.
A table's held-out problems are its validation split's first rows, or else the last rows of its training split.
"""

import importlib
import math

import arithmetic
from conversations import ARITHMETIC_TRAIN, builtin_difficulty, check_messages
from sources import DataError, closing, open_source
from tokenizer import split_reply


def final_answer(completion: str) -> str:
    """The answer a completion gives: the text after its thinking section, up to the end of its turn."""
    return split_reply(completion)[1].strip()


def is_right(problem: dict, completion: str) -> bool:
    """Exact match of the completion's final answer with the problem's (what pass@1 and pass@k count)."""
    return arithmetic.check(final_answer(completion), problem)


def reward(problem: dict, completion: str) -> float:
    """The default reward: 1 for the right final answer, 0 otherwise. Swap it with --reward module:function."""
    return float(is_right(problem, completion))


def load_reward(spec: str):
    """`module:function` -> the function (ValueError, one line, when it cannot be had)."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # whatever importing it raised: one line
        raise ValueError(f"--reward {spec}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"--reward {spec}: {module_name} has no function {name}")
    return function


def score(reward_fn, problem: dict, completion: str) -> float:
    """reward_fn(problem, completion) as a finite float, or a ValueError (one line) naming the problem."""
    try:
        value = float(reward_fn(problem, completion))
    except Exception as e:  # a user's function: whatever it raised, say where
        raise ValueError(f"the reward function raised {type(e).__name__}: {e} on the problem "
                         f"{question(problem)!r} (answer {problem['answer']!r})") from None
    if not math.isfinite(value):
        raise ValueError(f"the reward function returned {value} on the problem {question(problem)!r}; "
                         f"rewards must be finite numbers")
    return value


def question(problem: dict) -> str:
    """The problem's last user turn, as a person would name it."""
    return next((m["content"] for m in reversed(problem["messages"]) if m["role"] == "user"), "")


# ----------------------------------------------------------------------------- problems

def load_problems(dataset: str, seed: int, eval_answers: int, cache_dir: str) -> tuple:
    """(training problems, held-out problems, a description) of `dataset` (see the module docstring); DataError
    (one line) for data without checkable answers."""
    difficulty = builtin_difficulty(dataset)
    if difficulty:  # the problems fine-tuning trains on (same seed), and those its evaluations answer
        strip = lambda rows: [{**row, "messages": row["messages"][:-1]} for row in rows]  # noqa: E731
        return (strip(arithmetic.problems(ARITHMETIC_TRAIN, seed, False, difficulty)),
                strip(arithmetic.problems(eval_answers, seed + 1, True, difficulty)),
                f"arithmetic (built-in, {difficulty})")
    source = open_source(dataset, cache_dir)
    train_split, val_split = source.splits()
    train = read_problems(source, train_split)
    if val_split:
        held_out = read_problems(source, val_split)[:eval_answers]
    else:
        if len(train) <= eval_answers:
            raise DataError(f"{source.name} has {len(train)} problems: too few to hold {eval_answers} out for "
                            f"evaluation; lower --eval_answers")
        train, held_out = train[:len(train) - eval_answers], train[len(train) - eval_answers:]
    if not train:
        raise DataError(f"{source.name} has no problems to learn from")
    return train, held_out, source.name


def read_problems(source, split: str) -> list:
    """Every row of `split` as a problem: from `question` and `answer` columns, or from `messages`."""
    problems = []
    with closing(source.numbered_rows(split)) as rows:
        for where, row in rows:
            problems.append(problem_of(row, where))
    return problems


def problem_of(row: dict, where: str) -> dict:
    if "question" in row and "answer" in row:
        return {"messages": [{"role": "user", "content": str(row["question"])}],
                "answer": str(row["answer"]).rpartition("####")[2].strip().replace(",", "")}
    if "messages" in row:
        messages = check_messages(row["messages"], where, thinking=False)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the conversation ends with a {messages[-1]['role']} turn; its last turn must "
                            f"be the assistant's answer")
        return {"messages": messages[:-1], "answer": messages[-1]["content"].strip()}
    raise DataError(f"{where} has no checkable answer (columns: {', '.join(row) or 'none'}); RL needs `question` "
                    f"and `answer` columns (GSM8K's format: the final answer after ####), or `messages` whose last "
                    f"assistant turn is the answer")
