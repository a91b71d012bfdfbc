"""run_rl.py (GRPO) and rewards.py: the reward, the advantages, the loss against a hand computation, learning a
reward, resume, bad input; and the built-in set's harder difficulty that RL is measured on."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import arithmetic
import rewards
import run_rl
from config import ModelConfig, RLConfig
from conftest import assert_one_line_error, run_script
from model import Blueberry
from sources import DataError
from trainer import TrainError

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two threads on a shared 2-core machine wait on each other (BENCHMARKS.md)
TINY_RL = ["--prompts_per_step", "4", "--group_size", "4", "--max_new_tokens", "24", "--eval_answers", "0",
           "--dtype", "fp32", "--log_every", "1"]


def metrics(out_dir) -> list:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- rewards and problems

def test_the_reward_reads_the_final_answer_after_the_thinking():
    problem = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4"}
    assert rewards.reward(problem, "<think>\n1. 2+2=4\n</think>\n4<|im_end|>") == 1.0
    assert rewards.reward(problem, "<think>\n1. 2+2=4\n</think>\n5<|im_end|>") == 0.0
    assert rewards.reward(problem, "<think>\n1. 2+2=4\n4") == 0.0  # cut off in its steps: no answer yet
    assert rewards.reward(problem, "4<|im_end|>") == 1.0  # no thinking section: the reply is the answer
    assert rewards.final_answer("<think>\n14\n</think>\n 12 \n<|im_end|>") == "12"


def test_problems_come_from_question_answer_columns_or_conversations(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"Steps.\n#### 1,00{i}"}) + "\n" for i in range(5)))
    train, held_out, _ = rewards.load_problems(str(gsm), seed=0, eval_answers=2, cache_dir=str(tmp_path / "cache"))
    assert [p["answer"] for p in train] == ["1000", "1001", "1002"] and [p["answer"] for p in held_out] == ["1003",
                                                                                                           "1004"]
    assert train[0]["messages"] == [{"role": "user", "content": "q0"}]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Capital {i}?"},
        {"role": "assistant", "content": f"City {i}", "thinking": "recall"}]}) + "\n" for i in range(3)))
    train, held_out, _ = rewards.load_problems(str(chats), seed=0, eval_answers=1, cache_dir=str(tmp_path / "cache"))
    assert [m["role"] for m in train[0]["messages"]] == ["system", "user"] and held_out[0]["answer"] == "City 2"
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "no answers here"}) + "\n")
    with pytest.raises(DataError, match=r"text\.jsonl, line 1 has no checkable answer \(columns: text\).*question"):
        rewards.load_problems(str(text), seed=0, eval_answers=0, cache_dir=str(tmp_path / "cache"))


def test_hard_arithmetic_has_more_digits_operands_and_partial_products():
    rows = arithmetic.problems(300, seed=3, held_out=False, difficulty="hard")
    held = arithmetic.problems(100, seed=4, held_out=True, difficulty="hard")
    for row in rows + held:
        question, reply = row["messages"][0]["content"], row["messages"][1]
        numbers, op = re.findall(r"\d+", question), re.search(r"[+*]", question).group()
        assert len(numbers) == (3 if op == "+" else 2) and int(row["answer"]) == eval(question[8:-1])
        for line in reply["thinking"].split("\n"):  # every step's arithmetic holds
            expr, total = re.match(r"\d+\. ([\d+*]+)=(\d+)", line).groups()
            assert eval(expr) == int(total)
    assert {r["level"] for r in rows if r["kind"] == "add"} == {3, 4, 5, 6, 7}
    assert {len(re.findall(r"\d+", r["messages"][0]["content"])[1]) for r in rows if r["kind"] == "mul"} == {2}
    assert not {r["messages"][0]["content"] for r in rows} & {r["messages"][0]["content"] for r in held}
    assert arithmetic.product_steps(347, 25) == ["1. 347*5=1735", "2. 347*20=6940", "3. 1735+6940=8675"]
    assert arithmetic.difficulty_of("arithmetic") == "basic" and arithmetic.difficulty_of("data.jsonl") is None
    with pytest.raises(ValueError, match="arithmetic:basic, arithmetic:hard"):
        arithmetic.difficulty_of("arithmetic:harder")


def test_terse_arithmetic_is_the_hard_problems_with_3_worked_solutions_in_10():
    hard, terse = (arithmetic.problems(1000, seed=5, held_out=False, difficulty=d) for d in ("hard", "terse"))
    assert [r["messages"][0] for r in terse] == [r["messages"][0] for r in hard]  # the same problems
    worked = [t["messages"][1] == h["messages"][1] for t, h in zip(terse, hard)]
    assert 0.25 < sum(worked) / len(worked) < 0.35
    for row, shown in zip(terse, worked):
        if not shown:  # the whole problem in one step, its answer right
            question = row["messages"][0]["content"]
            assert row["messages"][1]["thinking"] == f"1. {question[8:-1].replace(' ', '')}={row['answer']}"
    held = [arithmetic.problems(100, seed=6, held_out=True, difficulty=d) for d in ("hard", "terse")]
    assert held[0] == held[1]  # held-out problems are only asked: their replies are the worked ones


# ----------------------------------------------------------------------------- advantages and the loss

def test_advantages_are_reward_minus_the_group_mean():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    assert run_rl.advantages(scores, 3, scale=False).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0])
    scaled = run_rl.advantages(scores, 3, scale=True)
    assert scaled[:3].tolist() == pytest.approx([1.1545, -0.5773, -0.5773], abs=1e-3) and scaled[3:].abs().sum() == 0


def tiny_policy(seed=0) -> Blueberry:
    torch.manual_seed(seed)
    model = Blueberry(ModelConfig(vocab_size=13, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=12))
    with torch.no_grad():  # away from the zero-initialized start, so that every token has its own probability
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    return model


# two prompts, their completions (samples: problem index, prompt ids, completion ids)
SAMPLES = [(0, [1, 2, 3], [4, 5]), (0, [1, 2, 3], [6, 7, 8, 9]), (1, [2, 2], [5])]


def test_the_loss_is_a_hand_computed_token_level_policy_gradient():
    cfg, adv = RLConfig(init_from="x", temperature=0.7), torch.tensor([0.5, -0.5, 2.0])
    model, n_tokens = tiny_policy(), 7.0  # the completions' tokens
    [batch] = run_rl.micro_batches(SAMPLES, adv, batch_size=8, device="cpu")
    loss = run_rl.policy_loss(model, batch, cfg, n_tokens)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    # by hand: -(1 / tokens) * sum over samples of A * sum over its completion tokens of log p(token)
    hand_model, hand = tiny_policy(), 0.0
    for (_, prompt, completion), a in zip(SAMPLES, adv):
        ids = torch.tensor([prompt + completion])
        logp = torch.log_softmax(hand_model(ids)[0].float() / 0.7, dim=-1)
        hand = hand - a * sum(logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(completion)) / n_tokens
    hand.backward()
    assert float(loss.detach()) == pytest.approx(-float((adv * torch.tensor([2.0, 4.0, 1.0])).sum()) / n_tokens)  # ratio 1
    for g, p in zip(got, hand_model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_ratios_are_clipped_and_the_kl_penalty_added():
    cfg, adv = RLConfig(init_from="x", clip_eps=0.2, kl_coef=0.1), torch.tensor([1.0, -1.0, 1.0])
    model = tiny_policy()
    [batch] = run_rl.micro_batches(SAMPLES, adv, batch_size=8, device="cpu")
    logp = run_rl.token_logprobs(model, batch["idx"], 1.0).detach()
    batch["old"] = logp - torch.linspace(-0.5, 0.5, logp.numel()).view(logp.shape)  # ratios from e^-0.5 to e^0.5
    batch["ref"] = logp + 0.3
    ratio = torch.exp(logp - batch["old"])
    a = batch["advantages"][:, None]
    by_hand = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a) + 0.1 * (torch.exp(torch.tensor(0.3)) - 1.3)
    expected = (by_hand * batch["mask"]).sum() / 7.0
    assert float(run_rl.policy_loss(model, batch, cfg, 7.0).detach()) == pytest.approx(float(expected), rel=1e-5)


def test_a_group_that_scores_alike_gives_no_gradient():
    model = tiny_policy()
    adv = run_rl.advantages(torch.tensor([1.0, 1.0, 1.0]), 3, scale=True)
    [batch] = run_rl.micro_batches(SAMPLES, adv, batch_size=8, device="cpu")
    run_rl.policy_loss(model, batch, RLConfig(init_from="x"), 7.0).backward()
    assert all(p.grad.abs().sum() == 0 for p in model.parameters())


# ----------------------------------------------------------------------------- the script

def test_rl_raises_a_reward_the_model_can_learn(chat_run, tmp_path):
    """The tiny chat model learns, within seconds, to give answers that start with 1 (a reward of its own,
    --reward module:function); the output folder is a chat model with its metrics and rl.png."""
    (tmp_path / "easy.py").write_text("from rewards import final_answer\n\ndef starts_with_one(problem, completion):\n"
                                      "    return float(final_answer(completion).startswith('1'))\n")
    out = tmp_path / "rl"
    proc = run_script("run_rl.py", "--init_from", chat_run, "--out_dir", out, "--reward", "easy:starts_with_one",
                      "--prompts_per_step", 8, "--group_size", 8, "--max_new_tokens", 64, "--max_steps", 10,
                      "--muon_lr", 0.02, "--adamw_lr", 0.003, "--log_every", 2, "--eval_every", 5, "--eval_answers", 8,
                      "--dtype", "fp32", env={**ONE_THREAD, "PYTHONPATH": str(tmp_path)}, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = metrics(out)
    trained = [r for r in rows if "reward_mean" in r]
    assert trained[-1]["reward_mean"] > trained[0]["reward_mean"] + 0.15, trained
    assert {"step", "reward_mean", "pass_at_k", "mean_len", "kl", "elapsed_s"} <= trained[0].keys()
    assert [r["step"] for r in rows if "pass_at_1" in r] == [0, 5, 10]  # the start, every eval_every, the end
    assert (out / "rl.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "config.json").read_text())
    assert config["chat"] is True and config["rl"]["reward"] == "easy:starts_with_one"
    chat = run_script("inference.py", "--out_dir", out, "--prompt", "What is 12 + 9?", "--max_new_tokens", 20,
                      "--seed", 0, timeout=120)
    assert chat.returncode == 0 and "<think>" not in chat.stdout, chat.stdout + chat.stderr


def test_resume_equals_an_uninterrupted_run(chat_run, tmp_path):
    flat = [*TINY_RL, "--init_from", chat_run, "--muon_lr", 0.02, "--save_every", 2, "--decay_frac", 0]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out, steps, more in ((straight, 4, []), (resumed, 2, []), (resumed, 4, ["--resume"])):
        proc = run_script("run_rl.py", *flat, "--out_dir", out, "--max_steps", steps, *more, env=ONE_THREAD)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    drop = ("elapsed_s", "tok_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in metrics(resumed)] == \
           [{k: v for k, v in r.items() if k not in drop} for r in metrics(straight)]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_one_line(trained_run, chat_run, tmp_path, monkeypatch, capsys):
    proc = run_script("run_rl.py", "--init_from", trained_run, "--out_dir", tmp_path / "a", timeout=120)
    assert_one_line_error(proc, "is a base model", "fine-tune it on conversations first", "run_train.py")
    with pytest.raises(SystemExit):
        run_rl.rl(["--init_from", str(chat_run), "--group_size", "1"])
    assert capsys.readouterr().err.strip() == ("error: group_size must be >= 2: each sample is judged against the "
                                               "others of its group")
    text = tmp_path / "notes.jsonl"
    text.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(DataError, match="no checkable answer.*`question` and `answer` columns"):
        run_rl.rl(["--init_from", str(chat_run), "--dataset", str(text), "--out_dir", str(tmp_path / "b")])
    (tmp_path / "broken.py").write_text("def reward(problem, completion):\n    return 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TrainError, match=r"reward function raised ZeroDivisionError: division by zero on the problem "
                                         r"'What is \d+ [+*] \d+\?' \(answer '\d+'\)"):
        run_rl.rl(["--init_from", str(chat_run), "--reward", "broken:reward", "--out_dir", str(tmp_path / "c"),
                   *TINY_RL])
