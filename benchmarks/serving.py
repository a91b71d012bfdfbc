"""Serving throughput (`serve`): concurrent clients through serve.py against the same requests one at a time, and
against `transformers serve --continuous-batching` serving the same model.

The model is the reference size as plain Llama (every switch off, random nonzero weights) with a BPE vocabulary
learnt from one embedded play. Blueberry serves its run folder; transformers serves its `export_hf.py` export, a
LlamaForCausalLM: the same function, so both must give the same greedy text. Each round sends the same prompts
(8 to 40 tokens, greedy, streamed) through 1, 4 and 16 client threads. A figure is the output tokens (each
answer's usage) per second of the round, and the time to the first token of each request.
"""

import dataclasses
import http.client
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import ENV, REPO, TINY, alternate, llama_peer_config, machine, print_table, verdict
from benchmarks.sampling import random_decoder
from checkpoint import TOKENIZER_DIR, save_model
from config import ModelConfig
from sources import clean_play, shakespeare_files
from tokenizer import build_tokenizer, decode, encode, save_tokenizer

GOAL_SCALING = 4.0  # 16 clients: at least this many times the tokens/s of one client at a time
GOAL_PEER = 1.5  # 16 clients: at least this many times transformers serve's tokens/s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(folder: Path, tiny: bool):
    """A run folder of the plain-Llama model and its tokenizer; returns (folder, the prompts)."""
    text = clean_play(shakespeare_files()[0].read_text(encoding="utf-8"))
    tokenizer = build_tokenizer("bpe", 512 if tiny else 2048, [text])
    base = dataclasses.replace(TINY, max_seq_len=64) if tiny else ModelConfig()
    cfg = llama_peer_config(dataclasses.replace(base, vocab_size=len(tokenizer)))
    save_model(folder, random_decoder(cfg, 0), {"chat": False})
    save_tokenizer(tokenizer, folder / TOKENIZER_DIR)
    ids = encode(tokenizer, text)
    count, shortest, longest = (4, 4, 12) if tiny else (16, 8, 40)
    lengths = [shortest + (longest - shortest) * i // (count - 1) for i in range(count)]
    return [decode(tokenizer, ids[1000 * i:1000 * i + n]) for i, n in enumerate(lengths)]


class Launched:
    """A server in a subprocess on a free port of 127.0.0.1, ready once /health answers."""

    def __init__(self, name, command, model, threads, wait_s=600):
        self.name, self.model, self.port = name, model, free_port()
        env = {**ENV, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([*command, "--port", str(self.port)], cwd=REPO, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + wait_s
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                self.log.seek(0)
                last = (self.log.read().strip().splitlines() or ["(no output)"])[-1]
                raise SystemExit(f"error: {name} did not start ({last})")
            time.sleep(0.5)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def ask(server: Launched, prompt: str, max_tokens: int) -> tuple:
    """One streamed completion: (seconds to the first text, output tokens by the usage, the text)."""
    body = json.dumps({"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    start, first, tokens, text = time.perf_counter(), None, 0, ""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        for choice in chunk["choices"]:
            if choice.get("text") and first is None:
                first = time.perf_counter() - start
            text += choice.get("text") or ""
        tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    connection.close()
    return first if first is not None else time.perf_counter() - start, tokens, text


def clients(server, prompts, n, max_tokens):
    def run():
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda p: ask(server, p, max_tokens), prompts))
    return run


def cmd_serve(args):
    tiny = args.tiny
    levels = (1, 4) if tiny else tuple(args.clients)
    max_tokens = 8 if tiny else args.max_tokens
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp, "run")
        prompts = make_run(run, tiny)
        servers = [Launched("Blueberry serve.py", [sys.executable, str(REPO / "serve.py"), "--out_dir", str(run),
                                                   "--dtype", "fp32", "--max_batch", str(max(levels))],
                            "run", args.threads)]
        try:
            if args.peer == "transformers":
                servers.append(start_transformers(run, Path(tmp, "hf"), args.threads))
            print(f"machine: {machine()}; servers: {args.threads or 'default'} torch threads")
            contenders = {(s.name, n): clients(s, prompts, n, max_tokens) for s in servers for n in levels}
            timing = alternate({f"{name}, {n} clients": fn for (name, n), fn in contenders.items()},
                               rounds=args.rounds, warmup=args.warmup)
        finally:
            for server in servers:
                server.stop()
    report(timing, servers, levels, prompts, max_tokens, args)


def start_transformers(run: Path, hf: Path, threads) -> Launched:
    """The peer: export_hf.py's plain Llama folder under `transformers serve --continuous-batching`."""
    proc = subprocess.run([sys.executable, str(REPO / "export_hf.py"), str(run), str(hf)], cwd=REPO, env=ENV,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: export_hf.py failed: {proc.stderr.strip()}")
    command = shutil.which("transformers")
    if command is None:
        raise SystemExit("error: no `transformers` command: pip install 'transformers[serving]' accelerate, or pass "
                         "--peer none")
    return Launched("transformers serve --continuous-batching", [command, "serve", "--continuous-batching",
                                                                  str(hf)], str(hf), threads)


def report(timing, servers, levels, prompts, max_tokens, args):
    def throughput(name):  # output tokens/s of each round
        t = timing[name]
        return [sum(tokens for _, tokens, _ in results) / s for results, s in zip(t.values, t.seconds)]

    rows = []
    for server in servers:
        for n in levels:
            name = f"{server.name}, {n} clients"
            ttft = sorted(first for results in timing[name].values for first, _, _ in results)
            rows.append((name, f"{statistics.median(throughput(name)):,.1f}", f"{timing[name].spread:.0%}",
                         f"{ttft[len(ttft) // 2] * 1e3:,.0f}", f"{ttft[int(len(ttft) * 0.95)] * 1e3:,.0f}"))
    print_table(f"{len(prompts)} prompts, {max_tokens} greedy tokens each, streamed, fp32, through N client threads; "
                f"median of {args.rounds} alternating rounds", ["server, clients", "output tokens/s", "spread",
                                                                "TTFT p50 ms", "TTFT p95 ms"], rows)

    def ratio(a, b):  # median over rounds of a's tokens/s over b's in the same round
        return statistics.median(x / y for x, y in zip(throughput(a), throughput(b)))

    ours, most = servers[0].name, max(levels)
    scaling = ratio(f"{ours}, {most} clients", f"{ours}, 1 clients")
    print(f"{ours}: {most} clients give {scaling:.2f}x the tokens/s of one at a time (goal >= {GOAL_SCALING}x: "
          f"{verdict(scaling >= GOAL_SCALING)})")
    if len(servers) > 1:
        peer = servers[1].name
        texts = [[text for _, _, text in timing[f"{s.name}, 1 clients"].values[0]] for s in servers]
        same = sum(a == b for a, b in zip(*texts))
        versus = ratio(f"{ours}, {most} clients", f"{peer}, {most} clients")
        print(f"{most} clients: {versus:.2f}x the tokens/s of {peer} (goal >= {GOAL_PEER}x: "
              f"{verdict(versus >= GOAL_PEER)}); the two agree on {same} of {len(prompts)} greedy answers")
