"""The data pipeline at scale (`data`): a generated corpus of a few GB in Parquet shards, streamed.

Rows: the time and disk of a capped read of the whole folder (`python data.py --max_tokens`), tokens/s
at 1 core and at all cores, threads (the fast tokenizer's encode_batch, what token_cache.py uses)
against a pool of single-threaded processes fed the same batches, the peak memory of a full streamed
pass, and how fast a prepared cache loads. Each run is a fresh process with its own cache, and
uses a BPE saved beforehand, so it only streams and tokenizes.
"""

import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ENV, REPO, alternate, machine, print_table, ratio, verdict

# One preparation through prepare_data, optionally on `cores` cores, or with a process pool as the
# encoder (`mode` = processes: one single-threaded tokenizer per core, fed each batch in contiguous
# chunks, forked before any tokenizer runs). A thread samples the anonymous resident set (Linux /proc)
# every 10 ms. Prints one JSON line.
_CHILD = """
import json, os, sys, threading, time
dataset, tok, cache, cap, cores, mode = sys.argv[1:7]
cap, cores = int(cap), int(cores)
if cores:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    os.environ["RAYON_NUM_THREADS"] = str(cores)
n = len(os.sched_getaffinity(0))
_tok = None

def _init(spec):
    global _tok
    from tokenizers import Tokenizer
    _tok = Tokenizer.from_str(spec)

def _encode(pieces):
    return [e.ids for e in _tok.encode_batch_fast(pieces, add_special_tokens=False)]

if mode == "processes":
    import multiprocessing
    os.environ["RAYON_NUM_THREADS"] = "1"
    spec = open(os.path.join(tok, "tokenizer.json")).read()
    pool = multiprocessing.get_context("fork").Pool(n, initializer=_init, initargs=(spec,))
    pool.map(abs, range(n))  # the workers are up before the clock starts
import data, token_cache
from config import TrainConfig
if mode == "processes":
    def pool_encoder(tokenizer):
        def run(pieces):
            step = -(-len(pieces) // n)
            return [ids for part in pool.map(_encode, [pieces[i:i + step] for i in range(0, len(pieces), step)])
                    for ids in part]
        return run
    token_cache._encoder = pool_encoder

def rss_mb():  # anonymous resident memory (heap, buffers), not the shared libraries' pages
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024

data.load_tokenizer(tok)  # transformers imported before the baseline is read
before, samples, done = rss_mb(), [], False

def sample():
    while not done:
        samples.append(rss_mb())
        time.sleep(0.01)

thread = threading.Thread(target=sample)
thread.start()
start = time.perf_counter()
d = data.prepare_data(TrainConfig(dataset=dataset, tokenizer=tok, cache_dir=cache, max_tokens=cap), 256, rank=1)
seconds = time.perf_counter() - start
done = True
thread.join()
print(json.dumps(dict(before=before, samples=samples, tokens=len(d.train_tokens) + len(d.val_tokens),
                      seconds=seconds, cores=n)))
"""

_LOAD_CHILD = """
import sys, time
start = time.perf_counter()
import data
from config import TrainConfig
imported = time.perf_counter()
data.prepare_data(TrainConfig(dataset=sys.argv[1], tokenizer=sys.argv[2], cache_dir=sys.argv[3], max_tokens=int(sys.argv[4])),
                  256, rank=1)
print(imported - start, time.perf_counter() - imported)
"""


def child(script, *argv) -> str:
    proc = subprocess.run([sys.executable, "-c", script, *map(str, argv)], cwd=REPO, env=ENV, capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"error: a benchmark child failed: {proc.stderr.strip().splitlines()[-1]}")
    return proc.stdout.strip().splitlines()[-1]


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def make_corpus(folder: Path, gigabytes: float, shard_mb: int) -> int:
    """Parquet shards shaped like a web corpus (id, url, text, score; 1,000-row groups, snappy): documents
    of 300 - 8,000 characters cut at random from the embedded plays. Returns the characters of text."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import sources
    plays = "".join(sources.clean_play(f.read_text(encoding="utf-8")) for f in sources.shakespeare_files())
    rng, chars, shard = random.Random(0), 0, 0
    folder.mkdir(parents=True)
    while chars < gigabytes * 1e9:
        texts, size = [], 0
        while size < shard_mb * 1e6:
            start = rng.randrange(len(plays) - 8000)
            texts.append(plays[start:start + rng.randint(300, 8000)])
            size += len(texts[-1])
        n = len(texts)
        table = pa.table({"id": [f"doc-{shard}-{i}" for i in range(n)],
                          "url": [f"https://example.org/{shard}/{i}" for i in range(n)],
                          "text": texts, "score": [rng.random() for _ in range(n)]})
        pq.write_table(table, folder / f"train-{shard:05d}.parquet", row_group_size=1000)
        chars, shard = chars + size, shard + 1
    return chars


def cmd_data(args):
    import sources
    from tokenizer import build_tokenizer, save_tokenizer
    print(f"machine: {machine()}")
    rows = []
    root = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.tmp))
    try:
        start = time.perf_counter()
        tok = root / "tok"
        plays = "".join(sources.clean_play(f.read_text(encoding="utf-8")) for f in sources.shakespeare_files())
        save_tokenizer(build_tokenizer("bpe", 8192, [plays]), tok)
        rows.append(("train a bpe:8192 on the embedded corpus (5 M chars)", f"{time.perf_counter() - start:.1f} s", ""))
        corpus = root / "corpus"
        start = time.perf_counter()
        chars = make_corpus(corpus, args.corpus_gb, args.shard_mb)
        n_shards, on_disk = len(list(corpus.iterdir())), disk_bytes(corpus)
        rows.append((f"generate the corpus: {n_shards} Parquet shards", f"{time.perf_counter() - start:.0f} s",
                     f"{chars / 1e9:.2f} G chars of text, {on_disk / 1e9:.2f} GB on disk"))
        runs = iter(range(10 ** 6))

        def prepare(cap, cores=0, mode="threads"):
            cache = root / f"cache{next(runs)}"
            result = json.loads(child(_CHILD, corpus, tok, cache, cap, cores, mode))
            result["disk"] = disk_bytes(cache)
            shutil.rmtree(cache)
            return result

        # a capped read of the whole folder: time and disk follow the cap, not the corpus
        capped = prepare(args.cap)
        rows.append((f"capped read: --max_tokens {args.cap:,} of the folder", f"{capped['seconds']:.1f} s",
                     f"{capped['disk'] / 1e3:,.0f} KB in cache_dir ({capped['tokens']:,} tokens; the folder: "
                     f"{on_disk / 1e9:.2f} GB)"))

        # tokens/s per core count, and threads against processes, alternating (the machine may be shared)
        contenders = {"1 core, threads": lambda: prepare(args.speed_tokens, 1),
                      "all cores, threads": lambda: prepare(args.speed_tokens),
                      "all cores, processes": lambda: prepare(args.speed_tokens, 0, "processes")}
        timing = alternate(contenders, rounds=args.rounds, warmup=0)
        for name, t in timing.items():
            speeds = sorted(r["tokens"] / r["seconds"] for r in t.values)
            rows.append((f"tokenize {args.speed_tokens / 1e6:.0f} M tokens, {name}",
                         f"{speeds[len(speeds) // 2] / 1e6:.2f} M tok/s",
                         f"{t.values[0]['cores']} core(s); {speeds[0] / 1e6:.2f} - {speeds[-1] / 1e6:.2f} over "
                         f"{args.rounds} rounds"))
        scaling = ratio(timing, "1 core, threads", "all cores, threads")
        threads_vs = ratio(timing, "all cores, processes", "all cores, threads")

        # a full streamed pass: after the first batches (the datasets / pyarrow streaming set-up, the
        # tokenizer's buffers) the resident set stays flat while the whole corpus goes through
        full = prepare(0)
        rss = full["samples"]
        settled, peak = rss[len(rss) // 10], max(rss)
        grew, drift = peak - full["before"], peak - settled
        rows.append((f"stream the whole corpus ({chars / 1e9:.2f} G chars)", f"+{grew:.0f} MB peak RSS",
                     f"{full['tokens'] / 1e6:,.0f} M tokens in {full['seconds']:.0f} s "
                     f"({full['tokens'] / full['seconds'] / 1e6:.2f} M tok/s); RSS {full['before']:.0f} MB before, "
                     f"{settled:.0f} at 10% of the pass, peak {peak:.0f}, {rss[-1]:.0f} at the end"))

        cache = root / "cache-load"
        prepare_cached = [corpus, tok, cache, args.cap]
        child(_LOAD_CHILD, *prepare_cached)
        imported, load = map(float, child(_LOAD_CHILD, *prepare_cached).split())
        rows.append(("a prepared cache, new process (what each torchrun rank does)", f"{load * 1e3:.0f} ms",
                     f"+ {imported:.1f} s to import data (torch)"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(f"data pipeline (a generated {args.corpus_gb:g} GB corpus, bpe:8192)", ["step", "result", "notes"], rows)
    print(f"all cores vs 1 core, threads: {scaling:.2f}x; threads vs processes at all cores: {threads_vs:.2f}x "
          f"(> 1: threads faster)")
    print(f"peak memory streaming {chars / 1e9:.2f} G chars: +{grew:.0f} MB in all (budget {args.mem_budget_mb} MB: "
          f"{verdict(grew <= args.mem_budget_mb)}), +{drift:.0f} MB after the first 10% of the pass (flat: at most "
          f"{args.flat_mb} MB: {verdict(drift <= args.flat_mb)})")
