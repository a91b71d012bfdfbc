"""serve.py's continuous batching: one thread runs the engine (`engine.Engine`), adding and cancelling jobs
between decode steps, and hands each token back to the asyncio event loop that serves HTTP. The engine is not
thread-safe, so this thread is the only one that touches it; request handlers only use `submit` and `cancel`."""

import sys
import threading

from serve_api import APIError


class Job:
    """One sequence to decode: a choice of a request. Its tokens go to `queue` as (index, token, finished)."""

    def __init__(self, index, prompt_ids, params, seed, queue):
        self.index, self.prompt_ids, self.params, self.seed, self.queue = index, prompt_ids, params, seed, queue
        self.rid = None  # the engine's request id, once added


class Batcher:
    """The one place the engine runs: a thread that adds and cancels jobs between steps, steps the engine while
    any job is live, and hands each token to its job's asyncio queue on the event loop. The engine is not
    thread-safe, so handlers only ever touch the inbox, under the lock."""

    def __init__(self, make_engine, max_batch: int, max_queue: int):
        self.make_engine, self.max_batch, self.capacity = make_engine, max_batch, max_batch + max_queue
        self.engine = make_engine()
        self.lock = threading.Condition()
        self.inbox = []  # ("add" | "cancel", job), in the order the handlers asked
        self.live = 0  # jobs admitted and not ended: those in the batch and those waiting for a row
        self.cancelled = 0  # jobs ended early: a client gone, or a stop string reached
        self.stopping = False
        self.loop = None
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)

    def start(self, loop):
        self.loop = loop
        self.thread.start()

    def stop(self):
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join()

    def submit(self, jobs: list):
        """Admit every job of one request, or none: a full queue is 429 (the client may retry later)."""
        if len(jobs) > self.capacity:
            raise APIError(400, f"n x prompts is {len(jobs)} sequences; this server holds at most {self.capacity} at "
                                f"once (--max_batch + --max_queue)", param="n")
        with self.lock:
            if self.live + len(jobs) > self.capacity:
                raise APIError(429, f"the server is busy: {self.live} sequences running or queued, room for "
                                    f"{self.capacity}; retry later", "rate_limit_exceeded", code="queue_full")
            self.live += len(jobs)
            self.inbox += [("add", job) for job in jobs]
            self.lock.notify()

    def cancel(self, job):
        with self.lock:
            self.inbox.append(("cancel", job))
            self.lock.notify()

    def counts(self) -> dict:
        with self.lock:
            return {"running": min(self.live, self.max_batch), "waiting": max(0, self.live - self.max_batch),
                    "cancelled": self.cancelled}

    def run(self):
        rows = {}  # engine request id -> job, for every job in the engine
        while True:
            with self.lock:
                while not (self.inbox or rows or self.stopping):
                    self.lock.wait()
                if self.stopping:
                    return
                inbox, self.inbox = self.inbox, []
            for op, job in inbox:
                if op == "add":
                    try:
                        job.rid = self.engine.add(job.prompt_ids, job.params, seed=job.seed)
                        rows[job.rid] = job
                    except Exception as e:  # validated before, so a bug: this request fails, the server goes on
                        self.fail([job], e)
                elif rows.pop(job.rid, None) is not None:  # a job already ended needs nothing
                    self.engine.cancel(job.rid)
                    self.ended(1, cancelled=True)
            if not rows:
                continue
            try:
                out = self.engine.step()
            except Exception as e:  # the requests in the batch fail; the server goes on
                self.fail(list(rows.values()), e)
                self.engine = self.make_engine()  # a fresh batch
                rows = {}
                continue
            events = [(rows[rid], token, finished) for rid, token, finished in out if rid in rows]
            for job, _, finished in events:
                if finished:
                    del rows[job.rid]
            self.ended(sum(finished for _, _, finished in events))
            self.deliver(events)

    def fail(self, jobs: list, error: Exception):
        print(f"serve: the engine failed: {type(error).__name__}: {error}", file=sys.stderr)
        self.deliver([(job, error, True) for job in jobs])
        self.ended(len(jobs))

    def ended(self, n: int, cancelled: bool = False):
        with self.lock:
            self.live -= n
            self.cancelled += n if cancelled else 0

    def deliver(self, events):
        def put():  # on the event loop: asyncio queues are not thread-safe
            for job, token, finished in events:
                job.queue.put_nowait((job.index, token, finished))
        self.loop.call_soon_threadsafe(put)
