"""The one sampling engine: a running batch that requests join and leave, for the CLI, chat, evaluation,
the server and RL.

    engine = Engine(model, max_batch=8)
    request_id = engine.add(prompt_ids, SamplingParams(max_new_tokens=100, temperature=0))
    while engine.has_work():
        for request_id, token, finished in engine.step():
            ...
    generate(model, prompt_ids, 100, seed=0)                      # one prompt alone: its new ids, one at a time
    generate_batch(model, [ids, other_ids], 100, temperature=0)   # several prompts decoded together

Each row of the batch holds one request, with its own cache length (model.KVCache.lengths), settings and
torch.Generator. A step feeds every running row its last token, prefills what joined (those prompts in one
forward pass, right-padded: a row's length hides what it has not written), and samples all rows' next tokens
at once. So a request gets the tokens it would get alone, whatever shares its batch and whenever it joined:
the same tokens at temperature 0 (fp32), and with a seed when sampling (one uniform draw per row from its
own generator, then an inverse-CDF pick for all rows together). `TextStream` turns tokens back into text.
"""

import itertools
from collections import deque
from dataclasses import dataclass, fields

import torch

from tokenizer import END_THINK, IM_END, THINK, decode


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples: the one definition of these settings for the CLI, chat, evaluation, the server
    and RL. A ValueError (one line) for values that make no sense."""
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = 50  # sample among the k most likely tokens (0/None: all)
    top_p: float | None = 0.9  # then among the fewest of those whose probability reaches top_p (1/None: all)
    repetition_penalty: float = 1.0  # > 1 makes the tokens a request has seen less likely (1: off)
    stop_ids: tuple = ()  # tokens that end the request (returned, as its last token); None entries are dropped

    def __post_init__(self):
        object.__setattr__(self, "stop_ids", tuple(int(t) for t in self.stop_ids if t is not None))
        top_p = 1.0 if self.top_p is None else self.top_p
        if self.max_new_tokens < 0 or self.temperature < 0 or (self.top_k or 0) < 0 or not 0 < top_p <= 1 \
                or self.repetition_penalty <= 0:
            raise ValueError(f"need max_new_tokens >= 0, temperature >= 0, top_k >= 0, 0 < top_p <= 1 and "
                             f"repetition_penalty > 0; got {self.max_new_tokens}, {self.temperature}, {self.top_k}, "
                             f"{self.top_p} and {self.repetition_penalty}")

    @classmethod
    def from_config(cls, cfg, stop_ids=()) -> "SamplingParams":
        """The settings of a config.SampleConfig (or of any object with these fields)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if f.name != "stop_ids"}, stop_ids=stop_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


# ----------------------------------------------------------------------------- sampling one step

def apply_repetition_penalty(logits, seen, penalty):
    """CTRL / Hugging Face rule: logits of tokens already seen are divided by `penalty` when positive and
    multiplied by it when negative, so penalty > 1 always makes them less likely. Returns a new tensor.

    logits: (B, vocab); seen: bool (B, vocab), True for every token id a row has seen; penalty: a float, or
    (B, 1) for one per row (1 leaves a row exactly as it was).
    """
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


class RowSettings:
    """The sampling settings of a batch's rows as the tensors sample_rows takes, built when the rows change.
    A setting every row leaves off is None, so that a batch pays only for what its rows ask."""

    def __init__(self, params: list, vocab: int, device):
        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        greedy = [p.greedy for p in params]
        self.greedy = all(greedy)
        self.greedy_rows = column(greedy, torch.bool) if any(greedy) and not self.greedy else None
        # Sampled rows share one top-k of the widest k among them; a row that keeps fewer masks the rest.
        ks = [None if g else min(p.top_k or vocab, vocab) for p, g in zip(params, greedy)]
        self.k = max((k for k in ks if k is not None), default=vocab)
        ks = [self.k if k is None else k for k in ks]
        self.k_rows = column(ks, torch.long) if min(ks) < self.k else None
        self.temperature = column([1.0 if g else p.temperature for p, g in zip(params, greedy)])
        nucleus = [not g and p.top_p is not None and p.top_p < 1 for p, g in zip(params, greedy)]
        # a row without top-p gets a threshold no cumulative probability reaches, rounding included
        self.top_p = column([p.top_p if n else 2.0 for p, n in zip(params, nucleus)]) if any(nucleus) else None
        penalties = [p.repetition_penalty for p in params]
        self.penalty = column(penalties) if any(r != 1 for r in penalties) else None


def sample_rows(logits, rows: RowSettings, uniform=None):
    """One token per row of logits (B, vocab) -> (B, 1). Greedy rows take the argmax; the others sample by
    inverse CDF: the first token (most likely first) whose cumulative probability passes the row's uniform
    draw (B, 1) in [0, 1). So a row's token depends on its own logits, settings and draw alone."""
    logits = logits.float()  # also for argmax, which is several times slower over bf16 on a CPU
    greedy = logits.argmax(dim=-1, keepdim=True) if rows.greedy or rows.greedy_rows is not None else None
    if rows.greedy:
        return greedy
    nucleus = rows.top_p is not None
    if rows.k < logits.size(-1):
        logits, indices = torch.topk(logits, rows.k)  # sorted, so top_p needs no sort of the vocabulary
    elif nucleus:
        logits, indices = torch.sort(logits, descending=True)
    else:
        indices = None
    if rows.k_rows is not None:
        logits = logits.masked_fill(torch.arange(rows.k, device=logits.device) >= rows.k_rows, float("-inf"))
    probs = torch.softmax(logits / rows.temperature, dim=-1)
    if nucleus:
        # drop a token when the tokens more likely than it already reach top_p (the first is always kept)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= rows.top_p, 0.0)
    cdf = probs.cumsum(-1)
    # `<=`: a draw of 0 takes the first token with any probability, never one that has none
    choice = (cdf <= uniform * cdf[:, -1:]).sum(-1, keepdim=True).clamp_max(probs.size(-1) - 1)
    tokens = choice if indices is None else indices.gather(-1, choice)
    return tokens if greedy is None else torch.where(rows.greedy_rows, greedy, tokens)


def sample_next(logits, temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = 0.9, generator=None):
    """One next token per row of logits (..., vocab) -> LongTensor (..., 1), every row with the same settings
    (see SamplingParams) and draws from one generator (the engine gives each row its own)."""
    flat = logits.reshape(-1, logits.size(-1))
    params = SamplingParams(1, temperature, top_k, top_p)
    uniform = None if params.greedy else torch.rand(flat.size(0), 1, generator=generator, device=flat.device)
    tokens = sample_rows(flat, RowSettings([params] * flat.size(0), flat.size(-1), flat.device), uniform)
    return tokens.view(*logits.shape[:-1], 1)


# ----------------------------------------------------------------------------- the engine

@dataclass(eq=False)
class Request:
    id: int
    tokens: list  # its prompt, then every token sampled
    params: SamplingParams
    generator: torch.Generator | None
    new: int = 0  # tokens sampled
    start: int = 0  # its row's cache holds tokens[start:-1]; the last token is fed at the next step
    filled: bool = False  # False: its row must be prefilled with tokens[start:] (it joined, or restarts)
    cancelled: bool = False


class Engine:
    """A running batch of up to `max_batch` requests (see the module's docstring). Requests wait in order while
    the batch is full; a finished or cancelled request's row goes to the next one at the next step.

    Past the context, a row restarts from its most recent half (re-prefilled, while the rows beside it go on
    untouched), so prompt + output may be any length and each row sees exactly what it would see decoded alone.
    """

    def __init__(self, model, max_batch: int = 16):
        self.model, self.max_batch = model, max_batch
        self.context = model.cfg.max_seq_len
        # A re-prefill costs as much as decoding several tokens, so keep room for many new tokens after it.
        self.keep = max(1, self.context // 2)
        self.device = next(model.parameters()).device
        self.running = []  # running[i] holds row i of the cache: the running rows are always the first ones
        self.waiting = deque()
        self.ids = itertools.count()
        self.cache = self.seen = self.settings = None  # made at the first step, in the caller's dtype (autocast)

    def __len__(self) -> int:
        return len(self.running) + len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def add(self, prompt_ids, params: SamplingParams, seed: int | None = None,
            generator: torch.Generator | None = None) -> int:
        """Queue a request; returns its id. An empty prompt starts from the first stop id (EOS, the separator
        between training documents). `seed` or `generator` makes its sampling reproducible (without either, its
        generator is seeded from torch's global one). A request for 0 tokens is done at once."""
        tokens = [int(t) for t in prompt_ids] or list(params.stop_ids[:1])
        if not tokens:
            raise ValueError("every prompt needs at least one token (or a stop id to start from)")
        if generator is None and not params.greedy:
            generator = torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())) if seed is None else seed)
        request = Request(next(self.ids), tokens, params, generator)
        if params.max_new_tokens:
            self.waiting.append(request)
        return request.id

    def cancel(self, request_id: int) -> bool:
        """Stop a request: it leaves the queue, or frees its row at the next step. False if it is not here."""
        for request in self.waiting:
            if request.id == request_id:
                self.waiting.remove(request)
                return True
        for request in self.running:
            if request.id == request_id:
                request.cancelled = True
                return True
        return False

    @torch.inference_mode()
    def step(self) -> list:
        """One token for every running request, after the waiting ones have taken the free rows:
        [(request_id, token_id, finished)], finished when the token is one of its stop ids or its
        max_new_tokens-th (its row is free for the next step)."""
        self._free([i for i, r in enumerate(self.running) if r.cancelled])
        self._admit()
        for request in self.running:  # past the context: restart from the most recent half of the window
            if len(request.tokens) - request.start > self.context:
                request.start, request.filled = len(request.tokens) - self.keep, False
        filled = sum(r.filled for r in self.running)
        if filled < len(self.running):
            self._prefill_last()
        logits = []
        if filled:  # feed each row its last token
            last = torch.tensor([r.tokens[-1] for r in self.running[:filled]], device=self.device)
            logits.append(self.model(last[:, None], cache=self.cache.rows(0, filled))[:, -1])
        if filled < len(self.running):
            logits.append(self._prefill(filled, len(self.running)))
        if not logits:
            return []
        tokens = self._sample(torch.cat(logits) if len(logits) > 1 else logits[0]).view(-1).tolist()
        events = []
        for request, token in zip(self.running, tokens):
            request.tokens.append(token)
            request.new += 1
            events.append((request.id, token, token in request.params.stop_ids
                           or request.new == request.params.max_new_tokens))
        self._free([i for i, (_, _, finished) in enumerate(events) if finished])
        return events

    def _admit(self):
        """Waiting requests take the free rows, in order."""
        if self.cache is None and self.waiting:
            self.cache = self.model.make_cache(self.max_batch)
        while self.waiting and len(self.running) < self.max_batch:
            request = self.waiting.popleft()
            row = len(self.running)
            self.running.append(request)
            self.settings = None
            if request.params.repetition_penalty != 1:  # every token id it has seen, for the penalty
                if self.seen is None:
                    self.seen = torch.zeros(self.max_batch, self.model.cfg.vocab_size, dtype=torch.bool,
                                            device=self.device)
                self.seen[row] = False
                self.seen[row, torch.tensor(request.tokens, device=self.device)] = True

    def _free(self, rows: list):
        """Drop the requests of these rows; the last running rows move into the holes."""
        for row in sorted(rows, reverse=True):
            last = len(self.running) - 1
            if row != last:
                self._move(last, row)
            self.running.pop()
            self.settings = None

    def _prefill_last(self):
        """Put the rows to prefill (joined, or restarting) after the others, so that each group is one slice of
        the cache. A row to prefill keeps nothing of its cache, so only the other row's cache moves."""
        lo, hi = 0, len(self.running) - 1
        while True:
            while lo < hi and self.running[lo].filled:
                lo += 1
            while lo < hi and not self.running[hi].filled:
                hi -= 1
            if lo >= hi:
                return
            request = self.running[lo]
            seen = None if self.seen is None else self.seen[lo].clone()
            self._move(hi, lo)
            self.running[hi] = request
            if seen is not None:
                self.seen[hi] = seen

    def _move(self, src: int, dst: int):
        """The request of row src (its cache, its seen tokens) takes row dst."""
        self.cache.move(src, dst)
        if self.seen is not None:
            self.seen[dst] = self.seen[src]
        self.running[dst] = self.running[src]
        self.settings = None

    def _prefill(self, start: int, stop: int):
        """Prefill the windows of rows start..stop-1 in one forward pass, right-padded (a row's length hides the
        padding it wrote); returns their next-token logits."""
        windows = [r.tokens[r.start:] for r in self.running[start:stop]]
        width = max(map(len, windows))
        idx = torch.tensor([w + [0] * (width - len(w)) for w in windows], device=self.device)
        lengths = torch.tensor([len(w) for w in windows], device=self.device)
        rows = self.cache.rows(start, stop)
        rows.lengths.zero_()
        logits = self.model(idx, cache=rows, logits_to_keep=lengths - 1)[:, -1]
        rows.lengths.copy_(lengths)
        for request in self.running[start:stop]:
            request.filled = True
        return logits

    def _sample(self, logits):
        """The running rows' next tokens (n, 1), each row with its settings and a draw from its own generator."""
        n = len(self.running)
        if self.settings is None:
            self.settings = RowSettings([r.params for r in self.running], logits.size(-1), self.device)
        rows = self.settings
        if rows.penalty is not None:
            logits = apply_repetition_penalty(logits, self.seen[:n], rows.penalty)
        uniform = None
        if not rows.greedy:
            draws = [0.0 if r.params.greedy else float(torch.rand((), generator=r.generator, device=r.generator.device))
                     for r in self.running]
            uniform = torch.tensor(draws, device=self.device)[:, None]
        tokens = sample_rows(logits, rows, uniform)
        if rows.penalty is not None:
            self.seen[:n].scatter_(1, tokens, True)
        return tokens


# ----------------------------------------------------------------------------- one request, a list of them

def sample(model, prompt_ids, params: SamplingParams, seed: int | None = None, generator=None):
    """One request decoded alone: yields its new token ids as they come (the last is a stop id if one was
    sampled). What the CLI and chat stream."""
    engine = Engine(model, max_batch=1)
    engine.add(prompt_ids, params, seed, generator)
    while engine.has_work():
        for _, token, _ in engine.step():
            yield token


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50,
             top_p: float | None = 0.9, repetition_penalty: float = 1.0, eos_id: int | None = None,
             seed: int | None = None, generator: torch.Generator | None = None):
    """Yield up to max_new_tokens new token ids (ints) one at a time; the last is eos_id if it was sampled.

    `seed` (or a torch.Generator) makes sampling reproducible. An empty prompt starts from eos_id,
    the separator between training documents.
    """
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, (eos_id,))
    return sample(model, prompt_ids, params, seed, generator)


def generate_batch(model, prompts: list, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50,
                   top_p: float | None = 0.9, repetition_penalty: float = 1.0, eos_id: int | None = None,
                   seed: int | None = None, generator: torch.Generator | None = None) -> list:
    """The new ids of every prompt (lists of ids, any lengths), decoded together in one batch: a list of
    lists, each ending at its row's eos_id if that was sampled. Each row is what `generate` gives for its
    prompt alone: at temperature 0, and with `seed`, row i samples as generate does with seed + i."""
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, (eos_id,))
    engine = Engine(model, max_batch=max(1, len(prompts)))
    ids = [engine.add(p, params, None if seed is None else seed + i, generator) for i, p in enumerate(prompts)]
    outputs = {i: [] for i in ids}
    while engine.has_work():
        for request_id, token, _ in engine.step():
            outputs[request_id].append(token)
    return [outputs[i] for i in ids]


# ----------------------------------------------------------------------------- tokens -> text

class TextStream:
    """Token ids in, printable text out, as a reply is generated: feed(token) and finish() return the new
    pieces, a list of (part, text).

    Each token is decoded together with those of the piece before it (a tokenizer may render a token differently
    at the start of a text), and text waits while it ends in U+FFFD: one byte-level token can hold half of a
    multi-byte character, which decodes to U+FFFD until the next token completes it. In a chat reply
    (`chat=True`) the text between THINK and END_THINK is the 'thinking' part and the rest the 'answer', each
    without the newlines that open it; a section token gives a piece with no text where its part starts, and
    IM_END ends the reply. Otherwise every piece is 'answer'. `texts` holds each part's text so far.
    """

    def __init__(self, tokenizer, chat: bool = False):
        self.tokenizer, self.chat = tokenizer, chat
        think, end_think, self.end = tokenizer.convert_tokens_to_ids([THINK, END_THINK, IM_END]) if chat else [None] * 3
        self.sections = {think: "thinking", end_think: "answer"} if chat else {}
        self.part, self.texts, self.done = "answer", {"thinking": "", "answer": ""}, False
        self.ids, self.prefix, self.read = [], 0, 0  # ids[prefix:read]: the tokens of the piece before

    def feed(self, token: int) -> list:
        if self.done:
            return []
        if token == self.end:
            self.done = True
            return self.finish()
        if token in self.sections:
            pieces = self.finish()
            self.part, self.ids, self.prefix, self.read = self.sections[token], [], 0, 0
            return pieces + [(self.part, "")]
        self.ids.append(token)
        return self._take()

    def finish(self) -> list:
        """What is still held back (a character left incomplete stays U+FFFD)."""
        return self._take(final=True)

    def _take(self, final: bool = False) -> list:
        before = decode(self.tokenizer, self.ids[self.prefix:self.read])
        text = decode(self.tokenizer, self.ids[self.prefix:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return []
        self.prefix, self.read = self.read, len(self.ids)
        text = text[len(before):]
        if self.chat and not self.texts[self.part]:
            text = text.lstrip("\n")  # the chat format opens each part with a newline
        self.texts[self.part] += text
        return [(self.part, text)] if text else []
