"""The data pipeline: tokenizer training, tokenization throughput, cache load time, peak memory (`data`)."""

import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ENV, REPO, alternate, machine, print_table, verdict

# Tokenize a local file through prepare_data in a fresh process while a thread samples the resident
# set (Linux /proc; ru_maxrss would also count the imports' peak). Prints: rss_before peak tokens seconds.
_PEAK_CHILD = """
import sys, threading, time
import data, tokenizer
from config import TrainConfig

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

tokenizer.load_tokenizer(sys.argv[2])  # import transformers before the baseline is read
before = peak = rss_mb()
done = False

def sample():
    global peak
    while not done:
        peak = max(peak, rss_mb())
        time.sleep(0.005)

thread = threading.Thread(target=sample)
thread.start()
start = time.perf_counter()
d = data.prepare_data(TrainConfig(dataset=sys.argv[1], tokenizer=sys.argv[2], cache_dir=sys.argv[3]), 256, rank=1)
seconds = time.perf_counter() - start
done = True
thread.join()
print(before, peak, len(d.train_tokens) + len(d.val_tokens), seconds)
"""

_COLD_LOAD_CHILD = """
import sys, time
start = time.perf_counter()
import data
from config import TrainConfig
imported = time.perf_counter()
data.prepare_data(TrainConfig(dataset="shakespeare", tokenizer="bpe", cache_dir=sys.argv[1]), 256, rank=1)
print(imported - start, time.perf_counter() - imported)
"""


def child(script: str, *argv) -> list:
    return subprocess.run([sys.executable, "-c", script, *map(str, argv)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, check=True).stdout.split()


def cmd_data(args):
    import numpy as np
    import data
    import sources
    from tokenizer import save_tokenizer
    from config import TrainConfig
    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        cfg = TrainConfig(dataset="shakespeare", tokenizer="bpe", cache_dir=str(tmp / "cache"))
        source = sources.open_source(sources.SHAKESPEARE, cfg)

        def once(fn):  # a one-off step (the second call would hit the cache)
            return alternate({"": fn}, rounds=1, warmup=0)[""]

        t = once(source.load)
        train = t.values[0][0]
        rows.append(("read + clean the embedded corpus", f"{t.median:.2f} s",
                     f"{train.n} plays, {train.chars / 1e6:.1f} M chars"))
        t = once(lambda: data._get_tokenizer("bpe", source, cfg, rank=1))
        tokenizer, name = t.values[0]
        rows.append((f"train the {name} tokenizer", f"{t.median:.2f} s", ""))
        t = once(lambda: data._get_tokens(source, tokenizer, name, cfg, rank=1))
        n = t.values[0][1]["n_tokens"]
        rows.append(("tokenize + write the cache", f"{t.median:.2f} s",
                     f"{n / 1e6:.2f} M tokens, {n / t.median / 1e3:,.0f} K tokens/s, "
                     f"{train.chars / n:.2f} chars/token"))
        with open(tmp / "scratch.bin", "wb") as f:
            t = alternate({"": lambda: data._write_tokens(f, tokenizer, train.read(0, train.n), 0, np.uint16)},
                          rounds=3, warmup=0)[""]
        rows.append(("tokenize (encode_batch_fast, median of 3)", f"{t.median:.2f} s",
                     f"{n / t.median / 1e3:,.0f} K tokens/s"))
        t = alternate({"": lambda: data.prepare_data(cfg, 256, rank=1)}, rounds=5)[""]
        rows.append(("prepare_data, cached (warm process, median of 5)", f"{t.median * 1e3:.0f} ms",
                     t.values[0].source))
        imported, load = map(float, child(_COLD_LOAD_CHILD, cfg.cache_dir))
        rows.append(("prepare_data, cached (new process)", f"{load * 1e3:.0f} ms",
                     f"mostly its first transformers import; + {imported:.1f} s to import data (torch)"))

        # peak memory: a file larger than the memory budget, through prepare_data in a fresh process
        text = "".join(sources.clean_play(f.read_text(encoding="utf-8")) for f in sources.shakespeare_files())
        save_tokenizer(tokenizer, tmp / "tok")
        path = tmp / "big.txt"
        with open(path, "w") as f:
            for _ in range(-(-args.file_mb * 2**20 // len(text))):
                f.write(text)
        before, peak, n, seconds = map(float, child(_PEAK_CHILD, path, tmp / "tok", tmp / "cache2"))
        size = path.stat().st_size / 2**20
        grew = peak - before
        rows.append((f"tokenize a {size:.0f} MB file (budget {args.mem_budget_mb} MB)", f"+{grew:.0f} MB peak RSS",
                     f"{n / 1e6:.1f} M tokens at {n / seconds / 1e3:,.0f} K tokens/s (RSS before {before:.0f} MB)"))
    print_table("data pipeline (embedded Shakespeare, bpe:8192)", ["step", "result", "notes"], rows)
    print(f"peak memory while tokenizing a {size:.0f} MB file: +{grew:.0f} MB (budget {args.mem_budget_mb} MB: "
          f"{verdict(grew <= args.mem_budget_mb and size > args.mem_budget_mb)})")
