"""Serve a trained Blueberry model over HTTP: an OpenAI-compatible API with continuous batching, and a web chat page.

    python serve.py --out_dir out                      # http://127.0.0.1:8000, the page at /
    python serve.py --out_dir out --port 0 --api_key KEY --max_batch 32

    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "ROMEO:", "max_tokens": 50, "temperature": 0}'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")   # any key when --api_key is not set
    client.chat.completions.create(model="out", messages=[{"role": "user", "content": "What is 12 + 9?"}])

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (chat models; the
thinking comes apart as `reasoning_content`), GET / (the page). Errors have OpenAI's shape
({"error": {"message", "type", "param", "code"}}): 400 bad request, 401 without the key, 429 queue full.

One thread steps the engine (`engine.Engine`): requests join and leave its running batch between decode
steps. The HTTP handlers run on uvicorn's event loop, hand requests over through `Batcher` (serve_batcher.py)
and read their tokens back from asyncio queues; the text is made here, per choice (`Choice`).
"""

import asyncio
import json
import random
import secrets
import signal
import socket
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

try:
    import uvicorn
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.responses import FileResponse, StreamingResponse
except ImportError as e:  # an install without the server's packages: say which, in one line
    sys.exit(f"error: serve.py needs fastapi and uvicorn ({e}); pip install -r requirements.txt")

import checkpoint
from config import ServeConfig, parse_args
from engine import Engine, SamplingParams, TextStream
from inference import load_checkpoint
from serve_api import APIError, ChatRequest, CompletionRequest, install_error_handlers
from serve_batcher import Batcher, Job
from tokenizer import IM_END, encode, render_prompt

PAGE = Path(__file__).resolve().parent / "serve_page.html"
FIELDS = {"thinking": "reasoning_content", "answer": "content"}  # a chat reply's parts, as the API names them
SHUTDOWN_GRACE_S = 5  # in-flight requests get this long to finish after SIGTERM / Ctrl-C; then they are cut


# ----------------------------------------------------------------------------- tokens -> text, per choice

class Choice:
    """What one choice says: its tokens made text by the engine's TextStream (for a chat model, the thinking
    apart from the answer), cut before a stop string, and why it ended. `feed` returns the new text as
    [(part, text)], part "thinking" or "answer"; `text` holds each part so far, `tokens` counts what the engine
    gave (the usage)."""

    def __init__(self, index, tokenizer, chat: bool, stops: list, stop_ids: tuple):
        self.index, self.chat, self.stops, self.stop_ids = index, chat, stops, stop_ids
        self.stream, self.part, self.held = TextStream(tokenizer, chat), "answer", ""
        self.text = {"thinking": "", "answer": ""}
        self.tokens, self.finish = 0, None

    def feed(self, token: int, finished: bool) -> list:
        self.tokens += 1
        out = []
        for part, text in self.stream.feed(token) + (self.stream.finish() if finished else []):
            if part != self.part:  # a section ends: what it held back is said
                out += self.flush()
                self.part = part
            out += self.add(text)
            if self.finish:  # a stop string
                return out
        if finished:
            self.finish = "stop" if token in self.stop_ids else "length"
            out += self.flush()
        return out

    def add(self, new: str) -> list:
        """Say `new`, except a tail that may begin a stop string (in a chat section, also trailing newlines: the
        format's), which waits for the next text. A stop string ends the choice, itself unsaid."""
        buf = self.held + new
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.finish, self.held = "stop", ""
            return self.say(buf[:cut])
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(buf)) + 1) if buf.endswith(s[:k])),
                   default=0)
        if self.chat:
            keep = max(keep, len(buf) - len(buf.rstrip("\n")))
        self.held = buf[len(buf) - keep:]
        return self.say(buf[:len(buf) - keep])

    def flush(self) -> list:
        """The end of a section: what was held back for a stop string that never came is said."""
        held, self.held = self.held, ""
        return self.say(held.rstrip("\n") if self.chat else held)

    def say(self, text: str) -> list:
        self.text[self.part] += text
        return [(self.part, text)] if text else []


# ----------------------------------------------------------------------------- requests -> jobs -> responses

class Served:
    """The model being served and what every request needs of it."""

    def __init__(self, model, tokenizer, chat: bool, name: str, cfg: ServeConfig):
        self.tokenizer, self.chat, self.name, self.api_key = tokenizer, chat, name, cfg.api_key
        self.context, self.vocab = model.cfg.max_seq_len, model.cfg.vocab_size
        ends = [tokenizer.eos_token_id] + ([tokenizer.convert_tokens_to_ids(IM_END)] if chat else [])
        self.stop_ids = {t for t in ends if t is not None}
        self.batcher = Batcher(lambda: Engine(model, cfg.max_batch), cfg.max_batch, cfg.max_queue)
        self.created = int(time.time())

    def prompt_ids(self, prompt) -> list:
        """/v1/completions' prompt (a string, strings, token ids or lists of them) -> lists of ids. An empty
        prompt starts from the end-of-text token, as a new document does."""
        prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        out = [encode(self.tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
        if any(t < 0 or t >= self.vocab for ids in out for t in ids):
            raise APIError(400, f"prompt: token ids must be in [0, {self.vocab})", param="prompt")
        return [ids or [self.tokenizer.eos_token_id] for ids in out]

    def params(self, body, max_tokens, prompt_len: int) -> SamplingParams:
        room = self.context - prompt_len
        if room < 1 or (max_tokens or 0) > room:
            raise APIError(400, f"this model's context is {self.context} tokens: the prompt has {prompt_len} and "
                                f"max_tokens asks {max_tokens or 'at least 1'} more; shorten the prompt or lower "
                                f"max_tokens", param="max_tokens", code="context_length_exceeded")
        return SamplingParams(max_new_tokens=max_tokens or room, temperature=body.temperature,
                              top_k=max(body.top_k, 0), top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                              stop_ids=() if body.ignore_eos else tuple(sorted(self.stop_ids)))

    def check_model(self, body):
        if body.model not in (None, self.name):
            raise APIError(400, f"model {body.model!r} is not served here; this server serves {self.name!r}",
                           param="model", code="model_not_found")


async def answer(served: Served, request: Request, body, prompts: list, max_tokens, chat: bool):
    """Decode every prompt `n` times in the running batch; a JSON response, or server-sent events."""
    stops = [body.stop] if isinstance(body.stop, str) else body.stop
    queue, jobs, choices = asyncio.Queue(), [], []
    for p, ids in enumerate(prompts):
        params = served.params(body, max_tokens, len(ids))
        for j in range(body.n):  # choice j of every prompt gets seed + j: the same answer alone or in a list
            seed = (body.seed + j) % 2 ** 63 if body.seed is not None else random.getrandbits(63)
            jobs.append(Job(len(jobs), ids, params, seed, queue))
            choices.append(Choice(len(choices), served.tokenizer, chat, [s for s in stops if s], params.stop_ids))
    served.batcher.submit(jobs)
    events = choice_events(served.batcher, jobs, choices, queue)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "created": int(time.time()),
            "model": served.name}
    usage = lambda: {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": sum(c.tokens for c in choices),
                     "total_tokens": sum(map(len, prompts)) + sum(c.tokens for c in choices)}
    if body.stream:
        return StreamingResponse(sse(events, head, choices, chat, usage, body.stream_options.include_usage),
                                 media_type="text/event-stream")
    await until_done(events, request)
    return {**head, "object": "chat.completion" if chat else "text_completion", "usage": usage(),
            "choices": [whole(c, chat) for c in choices]}


async def choice_events(batcher: Batcher, jobs: list, choices: list, queue: asyncio.Queue):
    """(choice, [(part, text)]) as the tokens arrive, until every choice has ended. A choice that a stop string
    ended is cancelled in the engine, and so is every choice left when the caller stops listening (the client
    went away)."""
    left = len(choices)
    try:
        while left:
            index, token, finished = await queue.get()
            choice = choices[index]
            if choice.finish:  # tokens decoded after a stop string, before the cancel took effect
                continue
            if isinstance(token, Exception):
                raise APIError(500, f"the engine failed: {type(token).__name__}: {token}", "server_error")
            deltas = choice.feed(token, finished)
            if choice.finish:
                left -= 1
                if not finished:
                    batcher.cancel(jobs[index])
            yield choice, deltas
    finally:
        for job, choice in zip(jobs, choices):
            if not choice.finish:
                batcher.cancel(job)


async def until_done(events, request: Request):
    """Run `events` to the end, unless the client goes first: then they are cancelled (freeing their rows)."""
    async def drain():
        async for _ in events:
            pass

    async def gone():  # with the body read, the next message is the disconnect (or the end, once we answered)
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(drain()), asyncio.ensure_future(gone())
    done, _ = await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    watch.cancel()
    if work in done:
        work.result()  # the engine's failure, if any
    else:  # the client left: closing `events` cancels what is left (nobody reads the answer)
        work.cancel()


def whole(c: Choice, chat: bool) -> dict:
    if chat:
        message = {"role": "assistant", "content": c.text["answer"], "reasoning_content": c.text["thinking"] or None}
        return {"index": c.index, "message": message, "logprobs": None, "finish_reason": c.finish}
    return {"index": c.index, "text": c.text["answer"], "logprobs": None, "finish_reason": c.finish}


async def sse(events, head: dict, choices: list, chat: bool, usage, include_usage: bool):
    """Server-sent events, a chunk per piece of text, a last one per choice with its finish_reason, the usage
    when asked for, then `data: [DONE]`."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if include_usage else {}

    def event(**fields):
        return f"data: {json.dumps({**head, **fields})}\n\n"

    def piece(c, part, text, finish=None):
        if chat:
            delta = {FIELDS[part]: text} if part else {}
            return {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": c.index, "text": text or "", "logprobs": None, "finish_reason": finish}

    if chat:
        yield event(choices=[{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for c in choices], **extra)
    try:
        async for c, deltas in events:
            for part, text in deltas:
                yield event(choices=[piece(c, part, text)], **extra)
            if c.finish:
                yield event(choices=[piece(c, None, None, c.finish)], **extra)
        if include_usage:
            yield event(choices=[], usage=usage())
    except APIError as e:
        yield f"data: {json.dumps(e.body)}\n\n"
    yield "data: [DONE]\n\n"


def make_app(served: Served) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_):
        served.batcher.start(asyncio.get_running_loop())
        yield
        served.batcher.stop()

    app = FastAPI(title="Blueberry", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)

    def key(request: Request):
        given = request.headers.get("authorization", "").encode()
        if served.api_key and not secrets.compare_digest(given, f"Bearer {served.api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(key)])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "blueberry", "max_model_len": served.context}]}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        served.check_model(body)
        return await answer(served, request, body, served.prompt_ids(body.prompt), body.max_tokens, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        served.check_model(body)
        if not served.chat:
            raise APIError(400, f"{served.name} is a base model (not trained on conversations): use /v1/completions",
                           param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        prompt = render_prompt(served.tokenizer, messages)
        return await answer(served, request, body, [prompt], body.max_completion_tokens or body.max_tokens, chat=True)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "chat": served.chat, "context": served.context,
                "auth": bool(served.api_key), **served.batcher.counts()}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    return app


# ----------------------------------------------------------------------------- the command line

def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so that a taken port fails at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host")
    return sock


async def serve(server, sock: socket.socket, banner: str):
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        print(banner, flush=True)
    await task


def main(argv=None):
    cfg, _, _ = parse_args(argv, "Serve a trained Blueberry model: an OpenAI-compatible API and a web chat page.",
                           classes=(ServeConfig,))
    sock = listen(cfg.host, cfg.port)
    model, tokenizer = load_checkpoint(cfg.out_dir, cfg.device, cfg.dtype)
    chat = bool(checkpoint.read_config(cfg.out_dir).get("chat"))
    served = Served(model, tokenizer, chat, cfg.model_name or Path(cfg.out_dir).resolve().name, cfg)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    server = uvicorn.Server(uvicorn.Config(make_app(served), log_level="warning",
                                           timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    asyncio.run(serve(server, sock, f"serving {served.name} ({'chat' if chat else 'base'} model, context "
                                    f"{served.context}) at {url} (the page at /, the API at /v1)"))


def stopped(*_):
    sys.stderr.write("serve: stopped\n")
    raise SystemExit(0)


if __name__ == "__main__":
    # uvicorn stops gracefully on SIGTERM / Ctrl-C, then raises the signal again: it then ends the process, quietly
    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGINT, stopped)
    try:
        main()
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError with a one-line message
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
