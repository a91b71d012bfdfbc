"""Reinforcement learning on checkable answers (GRPO): `python run_rl.py --init_from OUT_DIR [--FIELD VALUE ...]`.

    python run_train.py --dataset arithmetic:terse --out_dir out_chat       # first, a chat model (fine-tuned)
    python run_rl.py --init_from out_chat --dataset arithmetic:terse        # then RL on its own answers -> out_rl
    python run_rl.py --init_from out_chat --dataset arithmetic:terse --resume    # continue out_rl
    torchrun --nproc_per_node 8 run_rl.py --init_from out_chat ...          # DDP: each process its own prompts

One step: G completions (`group_size`) for each of `prompts_per_step` problems, sampled with the engine (one
running batch; rows that finish free their slot); each scored by the reward (rewards.py: the right final answer by
default); advantage = reward - the mean of its group; a token-level policy-gradient loss over the completion
tokens, PPO-clipped from the second pass over a batch (`ppo_epochs`), with an optional KL penalty to the starting
model; then Muon + AdamW under AMP, as in training. The parts are trainer.py's, as run_train.py's are; the output
folder is a chat model that inference.py, export_hf.py and serve.py load unchanged, with metrics.jsonl and rl.png.
"""

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import parallel
import rewards
import trainer
from common import world_info
from config import RLConfig, parse_args
from engine import Engine, SamplingParams
from muon import build_optimizers
from run_folder import RunFolder
from sources import DataError
from tokenizer import CHAT_TOKENS, IM_END, render_prompt
from trainer import TrainError

DESCRIPTION = "Improve a chat model by reinforcement learning on checkable answers (GRPO)."


def rl(argv=None):
    # set-up: processes, settings, device and precision, the model to start from, the reward and the problems
    rank, world, local_rank = parallel.init()
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    cfg, _, _ = parse_args(argv, DESCRIPTION, classes=(RLConfig,))
    device, dtype, amp, scaler = trainer.setup(cfg, local_rank)  # also refuses to replace a run unasked
    out_dir = Path(cfg.out_dir)
    source, tokenizer, description = start_from(cfg)
    say(f"init from {description}")
    try:
        reward_fn = rewards.load_reward(cfg.reward)
    except ValueError as e:
        raise TrainError(str(e)) from None
    train_problems, held_out, data_name = rewards.load_problems(cfg.dataset, cfg.seed, cfg.eval_answers,
                                                                 cfg.cache_dir)
    say(f"data: {data_name}: {len(train_problems):,} training problems, {len(held_out):,} held out for pass@1")

    # the policy, wrapped before its optimizers are built; the starting model, frozen, is the KL's reference
    raw_model = trainer.build_model(source.cfg, len(tokenizer), source).to(device)
    reference = source.to(device).requires_grad_(False)
    model = parallel.wrap(raw_model, cfg, device)
    optimizers = build_optimizers(raw_model, cfg)
    problems = ProblemBatches(train_problems, cfg.prompts_per_step, cfg.group_size, cfg.seed, rank)
    progress = trainer.Progress()
    if cfg.resume:
        state = checkpoint.load_resume_state(out_dir, raw_model.cfg)
        progress = trainer.Progress(**checkpoint.restore(state, raw_model, optimizers, scaler, problems))
        say(f"resumed from {out_dir} at step {progress.step}")
    run_info = {"rl": dataclasses.asdict(cfg), "init_from": description, "dataset": data_name, "chat": True,
                "validation": f"{len(held_out)} held-out problems", "sample_prompt": rewards.question(
                    (held_out or train_problems)[0])}
    folder = RunFolder(cfg, tokenizer, progress.step if cfg.resume else None, run_info, master)

    def evaluate():  # every rank answers its share of the held-out problems; rank 0 logs
        found = trainer.evaluate_answers(raw_model, tokenizer, held_out, amp, device)
        row = {**progress.row(), "pass_at_1": found["val_answer_acc"], "answer_tokens": found["val_answer_tokens"]}
        folder.log.append(row)
        plot(folder, out_dir)
        return f"pass@1 {row['pass_at_1']:.1%} on {len(held_out)} held-out problems ({row['answer_tokens']:.1f} " \
               f"tokens per reply)"

    if held_out and not cfg.resume:
        say(f"start: {evaluate()}")

    # the loop: sample, score, one policy-gradient step; then the log line, evaluation and checkpoint when due
    say(f"RL on {device} ({str(dtype).replace('torch.', '')}{f', {world} processes' if world > 1 else ''}): "
        f"{cfg.prompts_per_step} prompts x {cfg.group_size} samples per step{' per process' if world > 1 else ''}")
    meter, window, done = trainer.Meter(raw_model, device, world), Window(), progress.fraction(cfg) >= 1.0
    with trainer.CtrlC() as ctrl_c, trainer.progress_bar(cfg, progress, master) as bar:
        t_last = time.perf_counter()  # elapsed_s counts wall time, sampling, evaluations and saves included
        while not done:
            lrs = trainer.schedule(optimizers, progress, cfg)
            logging = (progress.step + 1) % cfg.log_every == 0
            loss, grad_norm, stats = grpo_step(model, raw_model, reference, optimizers, scaler, amp, tokenizer,
                                               problems, reward_fn, cfg, device, measure_kl=logging)
            tokens = stats.pop("tokens")  # prompt + completion tokens sampled, all ranks
            progress.advance(tokens, time.perf_counter() - t_last)
            t_last = time.perf_counter()
            done = trainer.agree_to_stop(progress, ctrl_c, cfg, device)
            meter.add(loss, tokens)
            window.add(stats)
            bar.update(trainer.bar_position(progress, cfg) - bar.n)
            step = progress.step
            if step % cfg.log_every == 0 or done or step % cfg.save_every == 0:
                row = {**meter.row(progress, lrs, grad_norm, out_dir), **window.means()}
                bar.set_postfix({"step": step, "reward": f"{row['reward_mean']:.2f}",
                                 "pass@k": f"{row['pass_at_k']:.0%}", "len": f"{row['mean_len']:.0f}"})
                folder.log.append(row)
            if held_out and step % cfg.eval_every == 0 and not done:
                bar.write(f"step {step}: {evaluate()}")
            if step % cfg.save_every == 0 or done:
                folder.save(raw_model, optimizers, scaler, problems, progress)

    # the end: the final evaluation, or the word that Ctrl-C saved the run
    if not trainer.stopped_early(progress, ctrl_c, out_dir, say):
        if held_out:
            say(f"\nfinal (step {progress.step}, {progress.elapsed_s:.0f}s): {evaluate()}")
        say(f"wrote {out_dir}/: {checkpoint.WEIGHTS}, {checkpoint.CONFIG}, {checkpoint.TOKENIZER_DIR}/, "
            f"{checkpoint.STATE}, {checkpoint.METRICS}, rl.png\nchat with it: python inference.py --out_dir {out_dir}")
    trainer.check_in_sync(raw_model, world, say)
    parallel.cleanup()


def start_from(cfg) -> tuple:
    """--init_from: (the chat model, its tokenizer, a description); TrainError (one line) for none, or for a base
    model, which has not learnt the chat format that prompts and answers are read in."""
    if not cfg.init_from:
        raise TrainError("--init_from is required: the chat model to improve, e.g. a fine-tune "
                         "(python run_train.py --dataset arithmetic --out_dir out_chat; then --init_from out_chat)")
    source, tokenizer, _, description = trainer.init_from(cfg, None, {})
    if any(token not in tokenizer.get_vocab() for token in CHAT_TOKENS):
        raise TrainError(f"--init_from {cfg.init_from} is a base model, not a chat model: fine-tune it on "
                         f"conversations first (python run_train.py --init_from {cfg.init_from} --dataset "
                         f"arithmetic --out_dir out_chat), then start RL from that (--init_from out_chat)")
    return source, tokenizer, description


class ProblemBatches:
    """The training problems of each step: step k of rank r draws prompts_per_step of them, and a sampling seed for
    each of their completions, from a generator seeded with (seed, r, k). So the state is the step counter, and a
    resumed run samples what it would have sampled."""

    def __init__(self, problems: list, n: int, group_size: int, seed: int, rank: int = 0):
        self.problems, self.n, self.group_size, self.seed, self.rank, self.step = problems, n, group_size, seed, rank, 0

    def next_batch(self) -> tuple:
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        self.step += 1
        chosen = [self.problems[i] for i in rng.integers(0, len(self.problems), size=self.n)]
        return chosen, rng.integers(0, 2 ** 62, size=self.n * self.group_size).tolist()

    def state_dict(self):
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state):
        self.seed, self.step = int(state["seed"]), int(state["step"])


# ----------------------------------------------------------------------------- one step

def grpo_step(model, raw_model, reference, optimizers, scaler, amp, tokenizer, problems, reward_fn, cfg, device,
              measure_kl: bool) -> tuple:
    """Sample, score, and update the policy (ppo_epochs optimizer steps). Returns (loss, grad norm, the step's
    figures over all ranks: reward_mean, pass_at_k, mean_len, tokens, and kl when measured)."""
    chosen, seeds = problems.next_batch()
    samples = sample(raw_model, tokenizer, chosen, seeds, cfg, amp)
    scores, right = judge(samples, chosen, tokenizer, reward_fn)
    advantage = advantages(torch.tensor(scores), cfg.group_size, cfg.scale_rewards)
    # a sample whose advantage is 0 adds nothing to the policy gradient (only to a KL term): it is left out
    train = [k for k in range(len(samples)) if cfg.kl_coef > 0 or advantage[k] != 0]
    G, world = cfg.group_size, world_info()[1]
    n_loss, n_tokens, n_new, total, solved = parallel.all_reduce_sum([
        sum(len(samples[k][2]) for k in train), sum(len(p) + len(c) for _, p, c in samples),
        sum(len(c) for _, _, c in samples), sum(scores), sum(any(right[g * G:(g + 1) * G]) for g in range(len(chosen)))
    ], device)
    stats = {"reward_mean": total / (len(samples) * world), "pass_at_k": solved / (len(chosen) * world),
             "mean_len": n_new / (len(samples) * world), "tokens": int(n_tokens)}
    if measure_kl:
        stats["kl"] = mean_kl(raw_model, reference, samples, cfg, amp, device)
    if not n_loss:  # every group on every rank scored alike: nothing to learn from this step
        return torch.zeros(()), torch.zeros(()), stats
    batches = micro_batches([samples[k] for k in train], advantage[train], cfg.batch_size, device)
    # DDP: each forward and backward pass is a collective, so every rank makes as many as the most any makes; the
    # passes a rank adds teach nothing (one sample, its mask zero)
    for _ in range(int(parallel.all_reduce_max([len(batches)], device)[0]) - len(batches)):
        batches += micro_batches(samples[:1], torch.zeros(1), 1, device)
        batches[-1]["mask"].zero_()
    for batch in batches:  # what the loss compares with, from before the update
        if cfg.kl_coef > 0:
            batch["ref"] = scored(reference, batch["idx"], cfg.temperature, amp)
        if cfg.ppo_epochs > 1:
            batch["old"] = scored(raw_model, batch["idx"], cfg.temperature, amp)
    loss_fn = lambda m, batch: policy_loss(m, batch, cfg, n_loss / world)  # noqa: E731 (DDP averages over ranks)
    for _ in range(cfg.ppo_epochs):
        loss, grad_norm = trainer.train_step(model, optimizers, batches, scaler, amp, cfg, loss_fn)
    return loss, grad_norm, stats


def sample(model, tokenizer, problems: list, seeds: list, cfg, amp) -> list:
    """group_size completions of each problem, decoded together by one engine (rows that finish free their
    slot): [(problem index, prompt ids, completion ids)], the samples of a problem adjacent. A completion ends
    with the end of its turn, or stops at max_new_tokens or where the context ends."""
    end_of_turn = tokenizer.convert_tokens_to_ids(IM_END)
    engine = Engine(model, max_batch=len(seeds))
    requests = []
    for i, problem in enumerate(problems):
        prompt = render_prompt(tokenizer, problem["messages"])
        room = model.cfg.max_seq_len - len(prompt)
        if room < 1:
            raise TrainError(f"the problem {rewards.question(problem)!r} takes {len(prompt)} tokens, the whole "
                             f"context of {model.cfg.max_seq_len}: drop it from the data")
        params = SamplingParams(min(cfg.max_new_tokens, room), cfg.temperature, cfg.top_k, None, stop_ids=(end_of_turn,))
        for g in range(cfg.group_size):
            requests.append((engine.add(prompt, params, seed=seeds[i * cfg.group_size + g]), i, prompt))
    completions = {request: [] for request, _, _ in requests}
    model.eval()
    with amp:
        while engine.has_work():
            for request, token, _ in engine.step():
                completions[request].append(token)
    model.train()
    return [(i, prompt, completions[request]) for request, i, prompt in requests]


def judge(samples: list, problems: list, tokenizer, reward_fn) -> tuple:
    """Each completion's reward, and whether its final answer is right (what pass@k counts)."""
    scores, right = [], []
    for i, _, completion in samples:
        text = tokenizer.decode(completion, skip_special_tokens=False)
        try:
            scores.append(rewards.score(reward_fn, problems[i], text))
        except ValueError as e:
            raise TrainError(str(e)) from None
        right.append(rewards.is_right(problems[i], text))
    return scores, right


def advantages(scores, group_size: int, scale: bool):
    """Each reward minus the mean of its group (a problem's samples, adjacent), so a group that scores alike
    teaches nothing; `scale` also divides by the group's std (GRPO as published; Dr. GRPO drops it, since it
    weighs most the groups whose rewards barely differ)."""
    groups = scores.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (groups.std(dim=1, keepdim=True) + 1e-4)
    return centered.flatten()


def micro_batches(samples: list, advantage, batch_size: int, device) -> list:
    """The samples as right-padded micro-batches of up to batch_size sequences (prompt + completion, longest
    first): dicts of idx (B, T), mask (B, T - 1: 1 where the next token is the completion's) and advantages (B,)."""
    order = sorted(range(len(samples)), key=lambda k: -(len(samples[k][1]) + len(samples[k][2])))
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(samples[k][1]) + len(samples[k][2]) for k in rows)
        idx, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width - 1)
        for r, k in enumerate(rows):
            _, prompt, completion = samples[k]
            idx[r, :len(prompt) + len(completion)] = torch.tensor(prompt + completion)
            mask[r, len(prompt) - 1:len(prompt) + len(completion) - 1] = 1
        out.append({"idx": idx.to(device), "mask": mask.to(device), "advantages": advantage[rows].to(device)})
    return out


# ----------------------------------------------------------------------------- the loss

def token_logprobs(model, idx, temperature: float):
    """log p(idx[:, t + 1] | idx[:, :t + 1]) for every position (B, T - 1), fp32, at the sampling temperature."""
    logits = model(idx)[:, :-1]
    flat = logits.reshape(-1, logits.size(-1)).float() / temperature
    return -F.cross_entropy(flat, idx[:, 1:].reshape(-1), reduction="none").view(idx.size(0), -1)


@torch.no_grad()
def scored(model, idx, temperature: float, amp):
    """token_logprobs without a gradient: the reference's, or the policy's before the update."""
    with amp:
        return token_logprobs(model, idx, temperature)


def kl_estimate(logp, ref_logp):
    """Per-token KL(policy || reference) estimate exp(r) - r - 1, r = ref - policy: >= 0, unbiased (GRPO's k3)."""
    diff = ref_logp - logp
    return torch.exp(diff) - diff - 1


def policy_loss(model, batch: dict, cfg, n_tokens: float):
    """A micro-batch's GRPO loss: per completion token -min(r A, clip(r, 1 - clip_eps, 1 + clip_eps) A), where
    r = p / p_old (on a batch's first pass the policy is the sampler: r = 1 and the gradient is A grad log p),
    plus kl_coef x the KL estimate to the reference; summed and divided by n_tokens, the completion tokens of the
    step (token-level, as DAPO: a long completion weighs by its tokens, not as one sample)."""
    logp = token_logprobs(model, batch["idx"], cfg.temperature)
    ratio = torch.exp(logp - batch["old"] if "old" in batch else logp - logp.detach())
    advantage = batch["advantages"][:, None]
    per_token = -torch.min(ratio * advantage, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * advantage)
    if cfg.kl_coef > 0:
        per_token = per_token + cfg.kl_coef * kl_estimate(logp, batch["ref"])
    return (per_token * batch["mask"]).sum() / n_tokens


def mean_kl(policy, reference, samples: list, cfg, amp, device) -> float:
    """KL of the policy from the starting model per completion token over these samples (all ranks)."""
    total, count = 0.0, 0.0
    for batch in micro_batches(samples, torch.zeros(len(samples)), cfg.batch_size, device):
        kl = kl_estimate(scored(policy, batch["idx"], cfg.temperature, amp),
                         scored(reference, batch["idx"], cfg.temperature, amp))
        total, count = total + float((kl * batch["mask"]).sum()), count + float(batch["mask"].sum())
    total, count = parallel.all_reduce_sum([total, count], device)
    return total / max(count, 1.0)


# ----------------------------------------------------------------------------- logging

class Window:
    """The RL figures of the steps since the last log line: their means."""

    def __init__(self):
        self.rows = []

    def add(self, stats: dict):
        self.rows.append(stats)

    def means(self) -> dict:
        keys = dict.fromkeys(k for row in self.rows for k in row)
        out = {k: float(np.mean([row[k] for row in self.rows if k in row])) for k in keys}
        self.rows = []
        return out


def plot(folder, out_dir: Path):
    folder.log.plot(out_dir / "rl.png", {"reward (mean)": "reward_mean", "pass@k (training prompts)": "pass_at_k",
                                         "pass@1 (held-out, greedy)": "pass_at_1"}, x="step", ylabel="reward, accuracy")


def main():
    try:
        rl()
    except (TrainError, DataError, checkpoint.CheckpointError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    except torch.cuda.OutOfMemoryError:
        sys.stderr.write("error: CUDA out of memory; lower --prompts_per_step or --group_size (fewer samples per "
                         "step), or --batch_size (smaller micro-batches)\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
