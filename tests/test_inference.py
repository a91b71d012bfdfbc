import io
import os
import shutil

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)

import inference
from common import pick_dtype
from config import ModelConfig, SampleConfig
from conftest import assert_one_line_error, run_script
from inference import apply_repetition_penalty, generate, generate_batch, load_checkpoint, sample_next
from model import Blueberry
from tokenizer import decode, encode, load_tokenizer, save_tokenizer

CONTEXT = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Decoding at batch 1 is a chain of tiny ops; when the machine is busy, a second OpenMP thread that
    every op waits for made these tests 10-70x slower (measured on 2 shared cores), and it never helped."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    """A tiny model with every weight random (a fresh model's zero-init head gives uniform logits)."""
    torch.manual_seed(0)
    m = Blueberry(ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=CONTEXT))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return m.eval()


def greedy_by_recomputation(model, prompt, n):
    """Greedy decoding with no cache: every step runs the model on the whole visible window, which
    (as in generate) restarts from the most recent half of the context whenever it would overflow."""
    keep, ids = CONTEXT // 2, list(prompt)
    start = len(ids) - keep if len(ids) > CONTEXT else 0
    for _ in range(n):
        ids.append(model(torch.tensor([ids[start:]]))[0, -1].argmax().item())
        if len(ids) - start > CONTEXT:
            start = len(ids) - keep
    return ids[len(prompt):]


@pytest.mark.parametrize("prompt_len, n", [(5, CONTEXT - 5), (5, 3 * CONTEXT), (3 * CONTEXT, CONTEXT)])
def test_greedy_equals_argmax_of_full_recomputation(model, prompt_len, n):
    """Within one context, and across it: a prompt longer than the context, and output that overflows it."""
    prompt = torch.randint(0, 61, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    with torch.no_grad():
        expected = greedy_by_recomputation(model, prompt, n)
    assert list(generate(model, prompt, n, temperature=0)) == expected


def test_top_k_1_is_greedy(model):
    prompt = [1, 2, 3]
    greedy = list(generate(model, prompt, 20, temperature=0))
    assert list(generate(model, prompt, 20, temperature=1.5, top_k=1, top_p=0.5, seed=7)) == greedy


def test_seeded_sampling_is_reproducible(model):
    prompt = [5, 6]
    a = list(generate(model, prompt, 30, temperature=1.0, seed=123))
    assert list(generate(model, prompt, 30, temperature=1.0, seed=123)) == a
    assert list(generate(model, prompt, 30, temperature=1.0, generator=torch.Generator().manual_seed(123))) == a
    assert list(generate(model, prompt, 30, temperature=1.0, seed=124)) != a


def test_eos_stops_generation(model):
    greedy = list(generate(model, [7, 8, 9], 12, temperature=0))
    eos = greedy[4]
    out = list(generate(model, [7, 8, 9], 12, temperature=0, eos_id=eos))
    assert out == greedy[:greedy.index(eos) + 1]  # EOS is the last token yielded


def test_sampling_past_the_context_with_every_option(model):
    prompt = [i % 61 for i in range(3 * CONTEXT)]
    out = list(generate(model, prompt, 3 * CONTEXT, temperature=1.2, top_k=20, top_p=0.8, repetition_penalty=1.3,
                        seed=0))
    assert len(out) == 3 * CONTEXT and all(0 <= t < 61 for t in out)


def test_empty_prompt_starts_from_eos_and_bad_settings_raise(model):
    from_eos = list(generate(model, [60], 5, temperature=0, eos_id=60))
    assert list(generate(model, [], 5, temperature=0, eos_id=60)) == from_eos
    with pytest.raises(ValueError, match="prompt needs at least one token"):
        list(generate(model, [], 5))
    with pytest.raises(ValueError, match="top_p"):
        list(generate(model, [1], 5, top_p=0.0))


def greedy_alone(model, prompts, n, **kwargs):
    return [list(generate(model, p, n, temperature=0, **kwargs)) for p in prompts]


PROMPT_LENGTHS = (8, 3, 40, 17, 1, 31)  # shorter and longer than the context of 32


@pytest.mark.parametrize("n", [5, 3 * CONTEXT])
def test_greedy_batch_equals_each_prompt_alone(model, n):
    """Prompts of different lengths decoded together give, row by row, the tokens generate gives alone:
    within the context, and far past it (rows restart from their recent half at their own times)."""
    prompts = [torch.randint(0, 61, (k,), generator=torch.Generator().manual_seed(k)).tolist() for k in PROMPT_LENGTHS]
    assert generate_batch(model, prompts, n, temperature=0) == greedy_alone(model, prompts, n)


def test_batch_rows_stop_at_their_own_eos_and_keep_every_option(model):
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]
    free = greedy_alone(model, prompts, 12)
    eos = free[1][3]  # a token the second row samples early
    got = generate_batch(model, prompts, 12, temperature=0, eos_id=eos)
    assert got == greedy_alone(model, prompts, 12, eos_id=eos)
    assert got[1] == free[1][:free[1].index(eos) + 1]  # ends with its EOS...
    assert any(len(row) > len(got[1]) for row in got)  # ...while other rows go on
    penalized = generate_batch(model, prompts, 12, temperature=0, repetition_penalty=1.5)
    assert penalized == greedy_alone(model, prompts, 12, repetition_penalty=1.5) != free
    sampled = generate_batch(model, prompts, 12, temperature=1.0, top_k=10, top_p=0.9, seed=3)
    assert sampled == generate_batch(model, prompts, 12, temperature=1.0, top_k=10, top_p=0.9, seed=3)
    assert [len(row) for row in sampled] == [12] * 3 and all(0 <= t < 61 for row in sampled for t in row)


def test_batch_of_one_is_generate(model):
    assert generate_batch(model, [[3, 1, 4]], 40, temperature=0.9, seed=5) == \
        [list(generate(model, [3, 1, 4], 40, temperature=0.9, seed=5))]
    with pytest.raises(ValueError, match="prompt needs at least one token"):
        generate_batch(model, [[1], []], 4)


# ----------------------------------------------------------------------------- sampling steps on hand-made logits

PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)


def draws(logits, n=4000, **kwargs):
    """Token frequencies over n draws (one batched call)."""
    tokens = sample_next(logits.expand(n, -1), generator=torch.Generator().manual_seed(0), **kwargs)
    return torch.bincount(tokens.view(-1), minlength=logits.size(-1)).float() / n


@pytest.mark.parametrize("top_p, kept", [(0.45, [1]), (0.79, [1, 3]), (0.81, [1, 3, 2]), (1.0, [1, 3, 2, 0])])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    freq = draws(PROBS.log(), temperature=1.0, top_k=0, top_p=top_p)
    assert sorted(freq.nonzero().view(-1).tolist()) == sorted(kept)
    expected = torch.zeros(4)
    expected[kept] = PROBS[kept] / PROBS[kept].sum()  # the kept tokens, renormalized
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)


def test_top_k_and_temperature():
    freq = draws(PROBS.log(), temperature=1.0, top_k=2, top_p=1.0)
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.625, 0.0, 0.375]), atol=0.03, rtol=0)
    cold = draws(PROBS.log(), temperature=0.5, top_k=0, top_p=1.0)  # p ** 2, renormalized
    torch.testing.assert_close(cold, PROBS ** 2 / (PROBS ** 2).sum(), atol=0.03, rtol=0)
    assert sample_next(PROBS.log()[None], temperature=0).item() == 1


def test_top_k_top_p_keep_the_same_tokens_as_hugging_face():
    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(0)) * 3
    for top_k, top_p in [(50, 0.9), (0, 0.6), (20, 1.0), (5, 0.3)]:
        hf = logits / 0.7
        if top_k:
            hf = TopKLogitsWarper(top_k)(None, hf)
        if top_p < 1:
            hf = TopPLogitsWarper(top_p)(None, hf)
        allowed = hf.isfinite()
        for seed in range(20):
            tokens = sample_next(logits, 0.7, top_k, top_p, torch.Generator().manual_seed(seed))
            assert allowed.gather(-1, tokens).all()
        # a token HF keeps with a fair probability is sampled by us too
        probs = torch.softmax(hf, -1)
        hits = torch.zeros_like(allowed)
        for seed in range(200):
            hits.scatter_(-1, sample_next(logits, 0.7, top_k, top_p, torch.Generator().manual_seed(seed)), True)
        assert hits[probs > 0.1].all()


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.2]])
    seen_ids = torch.tensor([[0, 1, 1, 4]])  # repeats count once
    seen = torch.zeros(1, 5, dtype=torch.bool).scatter(1, seen_ids, True)
    out = apply_repetition_penalty(logits, seen, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.5, 3.0, -0.4]]))
    torch.testing.assert_close(out, RepetitionPenaltyLogitsProcessor(2.0)(seen_ids, logits.clone()))
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.2]]))  # input untouched


def test_repetition_penalty_in_generate_avoids_repeats(model):
    plain = list(generate(model, [1, 2, 3], 20, temperature=0))
    penalized = list(generate(model, [1, 2, 3], 20, temperature=0, repetition_penalty=1e3))
    assert penalized != plain
    assert len(set(penalized)) == len(penalized) and not {1, 2, 3} & set(penalized)


def byte_tokenizer():
    """A byte-level tokenizer with no merges: every UTF-8 byte is its own token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_stream_prints_multibyte_characters_whole(monkeypatch):
    """Every UTF-8 byte is its own token (byte_tokenizer), so 'é' takes two tokens and the emoji four; the
    halves must never reach the terminal as U+FFFD."""
    tokenizer = byte_tokenizer()
    text = "héllo 😀 wörld"
    ids = encode(tokenizer, text)
    assert len(ids) == len(text.encode())
    monkeypatch.setattr(inference, "sample", lambda *args, **kwargs: iter(ids))  # the tokens stream() decodes

    class Terminal(io.StringIO):
        def write(self, piece):
            assert "\ufffd" not in piece
            return super().write(piece)

    out = Terminal()
    n, _ = inference.stream(None, tokenizer, "", SampleConfig(), out)
    assert n == len(ids) and out.getvalue() == text + "\n"


# ----------------------------------------------------------------------------- checkpoint and CLI

def test_load_checkpoint(trained_run):
    model, tokenizer = load_checkpoint(trained_run, "cpu")
    # the one dtype rule of training: bf16 on a CPU that multiplies it natively, else fp32
    assert not model.training and next(model.parameters()).dtype == pick_dtype("auto", torch.device("cpu"))
    assert next(load_checkpoint(trained_run, "cpu", "fp32")[0].parameters()).dtype == torch.float32
    assert len(tokenizer) == model.cfg.vocab_size
    ids = encode(tokenizer, "ROMEO:")
    out = list(generate(model, ids, 10, seed=0, eos_id=tokenizer.eos_token_id))
    assert 1 <= len(out) <= 10 and all(0 <= t < model.cfg.vocab_size for t in out)


def test_cli_one_shot_streams_the_greedy_continuation(trained_run):
    proc = run_script("inference.py", "--out_dir", trained_run, "--prompt", "ROMEO:", "--max_new_tokens", 25,
                      "--temperature", 0, "--verbose")
    assert proc.returncode == 0, proc.stderr
    model, tokenizer = load_checkpoint(trained_run, "cpu")
    new = list(generate(model, encode(tokenizer, "ROMEO:"), 25, temperature=0, eos_id=tokenizer.eos_token_id))
    assert proc.stdout == "ROMEO:" + decode(tokenizer, new) + "\n"
    assert "tokens/s" in proc.stderr


def test_cli_prompts_file_answers_every_line(trained_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\n\nJULIET:\nFirst Citizen:\n")
    proc = run_script("inference.py", "--out_dir", trained_run, "--prompts_file", prompts, "--max_new_tokens", 10,
                      "--seed", 1)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.index("ROMEO:") < out.index("JULIET:") < out.index("First Citizen:")
    assert out.count("-" * 40) == 2


def test_cli_interactive_answers_each_line_until_quit(trained_run):
    proc = run_script("inference.py", "--out_dir", trained_run, "--max_new_tokens", 8, "--seed", 0,
                      input="ROMEO:\n\nJULIET:\nquit\nNOT ANSWERED:\n")
    assert proc.returncode == 0, proc.stderr
    assert "ROMEO:" in proc.stdout and "JULIET:" in proc.stdout and "NOT ANSWERED" not in proc.stdout
    eof = run_script("inference.py", "--out_dir", trained_run, "--max_new_tokens", 8, input="HAMLET:\n")  # EOF ends it
    assert eof.returncode == 0 and "HAMLET:" in eof.stdout, eof.stderr


def test_cli_samples_fit_the_training_data(trained_run):
    proc = run_script("inference.py", "--out_dir", trained_run, "--samples", "--max_new_tokens", 5, "--seed", 0)
    assert proc.returncode == 0, proc.stderr
    assert "ROMEO:" in proc.stdout and "HAMLET: To be, or not to be," in proc.stdout


def test_default_prompts_follow_the_dataset():
    assert inference.default_prompts({"dataset": "shakespeare (embedded) + char", "sample_prompt": "ROMEO:"})[0] == "ROMEO:"
    stories = inference.default_prompts({"train": {"dataset": "roneneldan/TinyStories"}, "sample_prompt": "Tom and"})
    assert stories[0] == "Tom and" and "Once upon a time" in stories


@pytest.fixture
def broken_run(trained_run, tmp_path):
    """A copy of the trained run to damage."""
    out = tmp_path / "out"
    shutil.copytree(trained_run, out)
    return out


def test_missing_checkpoint_folder_is_one_line(tmp_path):
    assert_one_line_error(run_script("inference.py", "--out_dir", tmp_path / "nowhere", "--prompt", "x"), "nowhere")


def test_missing_weights_is_one_line(broken_run):
    (broken_run / "model.safetensors").unlink()
    assert_one_line_error(run_script("inference.py", "--out_dir", broken_run, "--prompt", "x"), "model.safetensors")


def test_missing_tokenizer_is_one_line(broken_run):
    shutil.rmtree(broken_run / "tokenizer")
    with pytest.raises(inference.checkpoint.CheckpointError, match="tokenizer"):
        load_checkpoint(broken_run, "cpu")


def test_mismatched_tokenizer_vocabulary_is_one_line(broken_run):
    tokenizer = load_tokenizer(broken_run / "tokenizer")
    tokenizer.add_tokens(["<extra-1>", "<extra-2>"])  # what another run's tokenizer looks like to this model
    save_tokenizer(tokenizer, broken_run / "tokenizer")
    assert_one_line_error(run_script("inference.py", "--out_dir", broken_run, "--prompt", "x"), "vocabulary")


@pytest.mark.parametrize("content", [None, "\n  \n"])
def test_missing_or_empty_prompts_file_is_one_line(trained_run, tmp_path, content):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_text(content)
    proc = run_script("inference.py", "--out_dir", trained_run, "--prompts_file", path)
    assert_one_line_error(proc, "prompts file")


def test_truncated_weights_are_reported_as_damaged(broken_run):
    weights = broken_run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_one_line_error(run_script("inference.py", "--out_dir", broken_run, "--prompt", "x"), "is damaged")


def test_ctrl_c_stops_the_answer_and_returns_to_the_prompt(trained_run):
    import signal
    import subprocess
    import sys
    import time
    from conftest import REPO
    proc = subprocess.Popen([sys.executable, str(REPO / "inference.py"), "--out_dir", str(trained_run),
                             "--max_new_tokens", "1000000", "--seed", "0"], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    proc.stdin.write("ROMEO:\n")
    proc.stdin.flush()
    assert proc.stdout.read(60).startswith("ROMEO:")  # the answer is streaming
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate("quit\n", timeout=120)  # read at the prompt the stopped answer returned to
    assert proc.returncode == 0 and "[stopped]" in err and "Traceback" not in err, err


def test_ctrl_d_at_the_prompt_ends_on_a_new_line(trained_run):
    """On a terminal, Ctrl-D ends the session and leaves the shell's prompt on a line of its own."""
    import pty
    import subprocess
    import sys
    import time
    from conftest import REPO
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(REPO / "inference.py"), "--out_dir", str(trained_run)], cwd=REPO,
                            stdin=follower, stdout=follower, stderr=follower, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    os.close(follower)
    seen, deadline = b"", time.time() + 60
    while b"> " not in seen and time.time() < deadline:
        seen += os.read(leader, 1024)
    os.write(leader, b"\x04")
    assert proc.wait(timeout=60) == 0
    try:
        while chunk := os.read(leader, 1024):
            seen += chunk
    except OSError:  # the terminal closes with the process
        pass
    os.close(leader)
    assert seen.endswith(b"> \r\n"), seen  # without the newline the shell's prompt would follow "> "
