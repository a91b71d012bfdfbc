"""engine.py: requests that join and leave a running batch get what they would get alone; the text decoder;
the sampling settings. The tiny model (context 32) and the byte-level tokenizer come from test_inference."""

import pytest
import torch

from engine import Engine, SamplingParams, TextStream, generate, generate_batch, sample
from test_inference import CONTEXT, byte_tokenizer, model, one_thread  # noqa: F401 (fixtures)
from tokenizer import END_THINK, IM_END, THINK, add_chat_format, encode


def prompt(n, seed=None):
    return torch.randint(0, 61, (n,), generator=torch.Generator().manual_seed(n if seed is None else seed)).tolist()


def run(engine, schedule: dict, cancel: dict = None) -> tuple:
    """Step `engine` until it has no work. schedule: {step: [(name, prompt, params, seed), ...]} added before that
    step; cancel: {step: [name, ...]} cancelled before it. Returns ({name: tokens}, {name: [finished flags]},
    [the names that got a token, per step])."""
    cancel, ids, tokens, flags, steps = cancel or {}, {}, {}, {}, []
    step = 0
    while engine.has_work() or any(s >= step for s in schedule):
        for name, ids_, params, seed in schedule.get(step, []):
            ids[engine.add(ids_, params, seed)] = name
            tokens[name], flags[name] = [], []
        for name in cancel.get(step, []):
            assert engine.cancel(next(i for i, n in ids.items() if n == name))
        got = []
        for request_id, token, finished in engine.step():
            name = ids[request_id]
            tokens[name].append(token)
            flags[name].append(finished)
            got.append(name)
        steps.append(got)
        step += 1
    return tokens, flags, steps


def alone(model, ids, params, seed=None):
    return list(sample(model, ids, params, seed))


def greedy(n, **kwargs):
    return SamplingParams(max_new_tokens=n, temperature=0, **kwargs)


def test_greedy_requests_that_join_at_any_step_get_what_they_get_alone(model):
    """Prompts of different lengths (shorter and longer than the context) arrive at different steps; the batch
    holds 3, so some wait; outputs long enough to pass the context restart at their own times."""
    arrivals = {0: [("a", 8, 40), ("b", 3, 5)], 2: [("c", 40, 12), ("d", 17, 70)], 3: [("e", 1, 9)],
                9: [("f", 31, 20), ("g", 5, 3)]}
    schedule = {step: [(name, prompt(n), greedy(new), None) for name, n, new in batch]
                for step, batch in arrivals.items()}
    tokens, flags, steps = run(Engine(model, max_batch=3), schedule)
    for batch in schedule.values():
        for name, ids, params, _ in batch:
            assert tokens[name] == alone(model, ids, params), name
            assert flags[name] == [False] * (params.max_new_tokens - 1) + [True]
    assert max(map(len, steps)) == 3
    first = {name: next(i for i, got in enumerate(steps) if name in got) for name in tokens}
    assert first["c"] == 2 and first["d"] > 2 and first["e"] > 3  # c took the free row; d and e waited for one


def test_a_seeded_request_samples_the_same_alone_and_in_any_batch(model):
    """Every row has its own generator and settings: a seeded request's tokens do not depend on what shares its
    batch (greedy rows, rows with other settings, unseeded rows) nor on when it joined."""
    mine = SamplingParams(60, temperature=1.0, top_k=10, top_p=0.8, repetition_penalty=1.3)
    ids = prompt(20)  # 20 + 60 tokens: past the context of 32
    others = [greedy(30), SamplingParams(25, temperature=0.7, top_k=None, top_p=None),
              SamplingParams(40, temperature=1.2, top_k=40, top_p=0.95), SamplingParams(50, top_p=0.5)]
    expected = alone(model, ids, mine, seed=7)
    for join in (0, 4):
        schedule = {0: [(f"o{i}", prompt(5 + i), p, None if i % 2 else i) for i, p in enumerate(others)]}
        schedule.setdefault(join, []).append(("mine", ids, mine, 7))
        tokens, _, _ = run(Engine(model, max_batch=5), schedule)
        assert tokens["mine"] == expected
        assert tokens["o2"] == alone(model, prompt(7), others[2], seed=2)  # the other seeded row too
    assert alone(model, ids, mine, seed=8) != expected
    # generate_batch seeds row i with seed + i
    rows = generate_batch(model, [ids, prompt(9)], 30, temperature=0.9, seed=11)
    assert rows == [list(generate(model, ids, 30, temperature=0.9, seed=11)),
                    list(generate(model, prompt(9), 30, temperature=0.9, seed=12))]


def test_cancel_frees_the_row_for_the_next_waiting_request(model):
    engine = Engine(model, max_batch=2)
    schedule = {0: [(name, prompt(4 + i), greedy(8), None) for i, name in enumerate("abcd")]}
    tokens, _, steps = run(engine, schedule, cancel={2: ["b", "d"]})  # b runs, d waits
    assert steps[:2] == [["a", "b"], ["a", "b"]] and steps[2] == ["a", "c"]  # c takes b's row at once
    assert len(tokens["b"]) == 2 and tokens["d"] == []
    assert tokens["c"] == alone(model, prompt(6), greedy(8))
    assert not engine.has_work() and len(engine) == 0 and not engine.cancel(0)  # a finished request is gone


def test_a_finished_row_is_reused_at_once(model):
    """A request ends at its max_new_tokens, or at a stop id (returned, finished); the next step the first
    waiting request has its row."""
    free = alone(model, prompt(6), greedy(10))
    stop = free[3]
    stops_early = greedy(10, stop_ids=(stop,))
    schedule = {0: [("short", prompt(4), greedy(2), None), ("stops", prompt(6), stops_early, None),
                    ("next", prompt(5), greedy(6), None), ("last", prompt(3), greedy(3), None)]}
    tokens, flags, steps = run(Engine(model, max_batch=2), schedule)
    assert steps[:3] == [["short", "stops"], ["short", "stops"], ["stops", "next"]]
    end = free.index(stop) + 1
    assert tokens["stops"] == free[:end] and flags["stops"][-1] and not any(flags["stops"][:-1])
    assert "last" in steps[end] and "last" not in steps[end - 1]
    assert tokens["next"] == alone(model, prompt(5), greedy(6))


def test_a_row_past_the_context_restarts_alone(model):
    """One row outgrows the context of 32 several times (each time it restarts from its recent half, re-prefilled
    on its own); the rows beside it, greedy and seeded, which fill the context exactly, get what they get alone (had
    they restarted with it, the seeded one would not)."""
    long, short, sampled = greedy(3 * CONTEXT), greedy(CONTEXT - 20), SamplingParams(CONTEXT - 6, 1.0, top_k=20)
    schedule = {0: [("long", prompt(30), long, None), ("short", prompt(20), short, None)],
                1: [("sampled", prompt(6), sampled, 3)]}
    tokens, _, _ = run(Engine(model, max_batch=3), schedule)
    assert tokens["long"] == alone(model, prompt(30), long)
    assert tokens["short"] == alone(model, prompt(20), short)
    assert tokens["sampled"] == alone(model, prompt(6), sampled, seed=3)


def test_an_empty_prompt_starts_from_the_first_stop_id_and_zero_tokens_is_done_at_once(model):
    engine = Engine(model, max_batch=2)
    assert alone(model, [], greedy(5, stop_ids=(60,))) == alone(model, [60], greedy(5, stop_ids=(60,)))
    with pytest.raises(ValueError, match="prompt needs at least one token"):
        engine.add([], greedy(5))
    engine.add([1, 2], greedy(0))
    assert not engine.has_work() and engine.step() == []


@pytest.mark.parametrize("settings, field", [(dict(max_new_tokens=-1), "max_new_tokens"),
                                             (dict(temperature=-0.5), "temperature"), (dict(top_k=-3), "top_k"),
                                             (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                                             (dict(repetition_penalty=0), "repetition_penalty")])
def test_bad_sampling_params_are_a_one_line_error(settings, field):
    with pytest.raises(ValueError) as info:
        SamplingParams(**settings)
    message = str(info.value)
    assert "\n" not in message and field in message and str(list(settings.values())[0]) in message


def test_sampling_params_from_a_sample_config():
    from config import SampleConfig
    params = SamplingParams.from_config(SampleConfig(temperature=0.3, top_k=7, max_new_tokens=9), stop_ids=(1, None))
    assert params == SamplingParams(9, 0.3, 7, 0.9, 1.0, (1,))


# ----------------------------------------------------------------------------- the text decoder

def test_text_stream_holds_back_a_character_split_over_tokens():
    tokenizer = byte_tokenizer()
    text = "héllo 😀"
    ids = encode(tokenizer, text)  # 'é' is two tokens, the emoji four
    stream = TextStream(tokenizer)
    pieces = [stream.feed(t) for t in ids]
    assert pieces[1] == [] and pieces[2] == [("answer", "é")]  # the first byte of 'é' waits for the second
    assert all(p == [] for p in pieces[-4:-1]) and pieces[-1] == [("answer", "😀")]
    assert "".join(t for p in pieces for _, t in p) == text == stream.texts["answer"]
    cut = TextStream(tokenizer)  # a reply that stops inside a character says what it has at the end
    assert [cut.feed(t) for t in ids[:-1]][-1] == [] and cut.finish() == [("answer", "\ufffd")]


def test_text_stream_sets_the_thinking_apart_in_a_chat_reply():
    tokenizer = byte_tokenizer()
    add_chat_format(tokenizer)
    think, end_think, end = tokenizer.convert_tokens_to_ids([THINK, END_THINK, IM_END])
    ids = [think, *encode(tokenizer, "\n1. 2 + 2 = 4 ✓\n"), end_think, *encode(tokenizer, "\nfour"), end,
           *encode(tokenizer, "never said")]
    stream = TextStream(tokenizer, chat=True)
    pieces = [piece for t in ids for piece in stream.feed(t)] + stream.finish()
    assert pieces[0] == ("thinking", "") and ("answer", "") in pieces  # where each part starts
    said = {part: "".join(t for p, t in pieces if p == part) for part in ("thinking", "answer")}
    assert said == stream.texts == {"thinking": "1. 2 + 2 = 4 ✓\n", "answer": "four"}  # opening newlines dropped
    assert all("\ufffd" not in t for _, t in pieces)
    plain = TextStream(tokenizer)  # not a chat: the special tokens are not text, the newlines stay
    assert "".join(t for tok in ids for _, t in plain.feed(tok)) == "\n1. 2 + 2 = 4 ✓\n\nfournever said"


def test_the_recipe_switches_decode_in_the_engine_as_without_a_cache():
    """value embeddings, residual/x0 lambdas, a bigram table, a ReLU² MLP and a logit soft-cap (issue 29) through the engine's
    cached, batched decoding: each request gets the tokens of greedy decoding by full recomputation."""
    from config import ModelConfig
    from model import Blueberry
    from test_inference import greedy_by_recomputation
    torch.manual_seed(0)
    recipe = Blueberry(ModelConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=CONTEXT,
                                   mlp="relu2", value_embeds=True, resid_lambdas=True, logit_softcap=5.0,
                                   bigram_buckets=37))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in recipe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    recipe.eval()
    schedule = {0: [("a", prompt(8), greedy(30), None), ("b", prompt(3), greedy(12), None)],
                2: [("c", prompt(20), greedy(9), None)]}
    tokens, _, _ = run(Engine(recipe, max_batch=2), schedule)
    with torch.no_grad():
        for batch in schedule.values():
            for name, ids, params, _ in batch:
                assert tokens[name] == greedy_by_recomputation(recipe, ids, params.max_new_tokens), name
