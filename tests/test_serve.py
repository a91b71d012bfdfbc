"""serve.py: the real server in a subprocess on 127.0.0.1, called with the official `openai` client, plain HTTP
(errors, the server-sent events' framing, clients that leave) and headless Chromium (the page).

At temperature 0 in fp32 every answer must be the tokens `engine.generate` gives its prompt alone, whatever
shares the batch. The tiny runs use a char tokenizer, so equal text is equal tokens and every stop string of
two or more characters arrives split over tokens.
"""

import base64
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from conftest import REPO, assert_one_line_error, run_script
from engine import generate
from inference import load_checkpoint
from tokenizer import END_THINK, IM_END, THINK, build_tokenizer, decode, encode, render_prompt

KEY = "sekrit"
MAX_BATCH, MAX_QUEUE = 4, 12  # 16 concurrent clients fill the batch and the queue: rows turn over
# One torch thread: on 2 shared cores, a second OpenMP thread made each decode step of the tiny model 30-50x
# slower (2.8 ms -> 78 ms measured while other tests ran), and the test process needs a core too.
ENV = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


class Server:
    """`python serve.py` on a free port (--port 0: it prints its URL once it serves); stderr goes to a file."""

    def __init__(self, out_dir, tmp, *flags):
        self.stderr = tmp / f"serve-{time.monotonic_ns()}.txt"
        self.proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--out_dir", str(out_dir), "--port", "0",
                                      "--dtype", "fp32", *map(str, flags)], cwd=REPO, text=True,
                                     env={**os.environ, **ENV},
                                     stdout=subprocess.PIPE, stderr=self.stderr.open("w"))
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        banner = self.proc.stdout.readline() if ready else ""
        found = re.search(r"http://127\.0\.0\.1:(\d+)", banner)
        assert found, banner + self.stderr.read_text()
        self.url, self.port = found.group(0), int(found.group(1))

    def client(self, key=KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self):
        """SIGTERM; the exit code. The server must have logged no traceback."""
        self.proc.terminate()
        code = self.proc.wait(30)
        assert "Traceback" not in self.stderr.read_text(), self.stderr.read_text()
        return code


def post(url, body, key=KEY, raw=None):
    """(status, parsed JSON) of a POST; `raw` bytes are sent as they are."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, raw if raw is not None else json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(server):
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        return json.loads(r.read())


def open_stream(server, path, body, key=KEY) -> socket.socket:
    """A raw HTTP request whose answer is read only up to its first event: the caller then leaves (closes)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {key}"
                 f"\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    if body.get("stream"):
        seen = b""
        while b"data: " not in seen:
            seen += sock.recv(65536)
        assert seen.startswith(b"HTTP/1.1 200"), seen
    return sock


def wait_until(check, seconds=20):
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def base(trained_run, tmp_path_factory):
    server = Server(trained_run, tmp_path_factory.mktemp("serve"), "--max_batch", MAX_BATCH, "--max_queue", MAX_QUEUE,
                    "--api_key", KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def base_model(trained_run):
    torch.set_num_threads(1)  # the server has the other core
    return load_checkpoint(trained_run, "cpu", "fp32")


def alone(model_and_tokenizer, prompt, max_tokens):
    """The text `engine.generate` gives the prompt alone, greedy, and its number of tokens."""
    model, tokenizer = model_and_tokenizer
    ids = list(generate(model, encode(tokenizer, prompt), max_tokens, temperature=0, eos_id=tokenizer.eos_token_id))
    return tokenizer.decode(ids, skip_special_tokens=True), len(ids)


def sse(server, body, path="/v1/completions"):
    """The raw lines of a streamed answer."""
    request = urllib.request.Request(server.url + path, json.dumps({**body, "stream": True}).encode(),
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        return r.read().decode().split("\n")


# ----------------------------------------------------------------------------- a base model

def test_health_models_and_the_api_key(base, trained_run):
    assert health(base)["status"] == "ok" and health(base)["chat"] is False
    assert [m.id for m in base.client().models.list()] == [trained_run.name]  # the run folder's name
    with pytest.raises(openai.AuthenticationError):
        base.client("wrong").models.list()
    status, body = post(base.url + "/v1/completions", {"prompt": "A", "max_tokens": 2}, key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_completion_streamed_or_whole_is_what_generate_gives_alone(base, base_model):
    prompt, expected = "ROMEO:\n", alone(base_model, "ROMEO:\n", 30)
    whole = base.client().completions.create(model=health(base)["model"], prompt=prompt, max_tokens=30, temperature=0)
    assert (whole.choices[0].text, whole.usage.completion_tokens) == expected
    assert whole.choices[0].finish_reason == ("length" if expected[1] == 30 else "stop")
    assert whole.usage.prompt_tokens == len(encode(base_model[1], prompt))
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    lines = sse(base, {"prompt": prompt, "max_tokens": 30, "temperature": 0, "stream_options": {"include_usage": True}})
    events = [line for line in lines if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]" and lines[-2:] == ["", ""]
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected[0]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole.usage.model_dump(exclude_none=True)
    assert chunks[-2]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason


def test_sixteen_concurrent_clients_each_get_their_alone_tokens(base, base_model):
    """Prompts of different lengths, arriving at different times, streamed or not, through a batch of 4 rows."""
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n"
    cases = [(text[:3 + 2 * i], 8 + 3 * (i % 5), i % 2 == 0) for i in range(16)]  # all within the context of 64
    client = base.client()

    def ask(i):
        prompt, max_tokens, stream = cases[i]
        time.sleep(0.02 * i)
        kwargs = dict(model=None, prompt=prompt, max_tokens=max_tokens, temperature=0)
        if not stream:
            return client.completions.create(**kwargs).choices[0].text
        return "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    for (prompt, max_tokens, _), answer in zip(cases, answers):
        assert answer == alone(base_model, prompt, max_tokens)[0], prompt


def test_stop_strings_end_the_answer_unsaid_even_split_over_tokens(base, base_model):
    full, _ = alone(base_model, "JULIET:\n", 40)
    stop = full[12:15]  # three characters: three tokens
    cut = full.index(stop)
    client = base.client()
    for stops in (stop, ["zzz", stop]):
        r = client.completions.create(model=None, prompt="JULIET:\n", max_tokens=40, temperature=0, stop=stops)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (full[:cut], "stop")
        assert r.usage.completion_tokens == cut + len(stop)  # decoding ended at the token that completed it
        streamed = client.completions.create(model=None, prompt="JULIET:\n", max_tokens=40, temperature=0, stop=stops,
                                             stream=True)
        assert "".join(c.choices[0].text for c in streamed) == full[:cut]
    r = client.completions.create(model=None, prompt="JULIET:\n", max_tokens=40, temperature=0, stop="\x00never")
    assert (r.choices[0].text, r.choices[0].finish_reason) == (full, "length")  # held-back text comes out at the end


def test_n_seed_and_lists_of_prompts(base):
    client = base.client()
    ask = dict(model=None, max_tokens=24, temperature=1.0, seed=7, extra_body={"top_k": 0})  # vLLM's extra setting
    two = client.completions.create(prompt="KING:", n=2, **ask)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text != two.choices[1].text
    assert [c.text for c in client.completions.create(prompt="KING:", n=2, **ask).choices] == \
        [c.text for c in two.choices]  # the same seed, the same samples
    both = client.completions.create(prompt=["QUEEN:", "KING:"], n=2, **ask)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices[2:]] == [c.text for c in two.choices]  # alone or in a list, and batched
    assert both.usage.prompt_tokens == len("QUEEN:") + len("KING:")
    assert 4 <= both.usage.completion_tokens <= 4 * 24
    ids = client.completions.create(prompt=[[5, 6, 7]], max_tokens=3, temperature=0, model=None)
    assert ids.usage.prompt_tokens == 3 and ids.choices[0].text


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "A", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "A", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "A", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "A", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "A" * 60, "max_tokens": 10}, "max_tokens"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "A", "model": "gpt-4"}, "model"),
    ("/v1/completions", {"prompt": "A", "logprobs": 2}, None),
    ("/v1/completions", {"prompt": "A", "n": 17}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),
])
def test_bad_requests_are_400_in_openai_shape(base, path, body, param):
    status, answer = post(base.url + path, body)
    assert status == 400, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["param"] == param
    assert answer["error"]["type"] == "invalid_request_error" and "\n" not in answer["error"]["message"]


def test_bad_json_and_unknown_paths_then_the_server_still_serves(base):
    status, answer = post(base.url + "/v1/completions", None, raw=b'{"prompt": "A",')
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    status, answer = post(base.url + "/v1/completions", None, raw=b'["A"]')
    assert status == 400 and "JSON object" in answer["error"]["message"]
    status, answer = post(base.url + "/v1/nothing", {})
    assert status == 404 and answer["error"]["message"]
    assert base.client().completions.create(model=None, prompt="A", max_tokens=3).usage.completion_tokens >= 1


def test_a_full_queue_is_429_and_a_client_that_leaves_frees_its_rows(base):
    """n=16 fills the 4 rows and the queue of 12 (each sequence decodes to the end of the context: 4 waves of
    ~58 steps), so the next request cannot fit. The client then leaves after its first event: its sequences
    are cancelled, the 12 still waiting at least."""
    long = {"prompt": "ROMEO:", "n": MAX_BATCH + MAX_QUEUE, "temperature": 0, "ignore_eos": True}
    before = health(base)["cancelled"]
    sock = open_stream(base, "/v1/completions", {**long, "stream": True})
    status, answer = post(base.url + "/v1/completions", {"prompt": "A", "max_tokens": 2})
    assert status == 429 and answer["error"]["code"] == "queue_full", answer
    sock.close()
    wait_until(lambda: health(base)["running"] == health(base)["waiting"] == 0)
    assert health(base)["cancelled"] - before >= MAX_QUEUE
    # the same with a request that does not stream: the server notices the client leave while it decodes
    sock = open_stream(base, "/v1/completions", long)
    wait_until(lambda: health(base)["waiting"] > 0)
    sock.close()
    wait_until(lambda: health(base)["running"] == health(base)["waiting"] == 0)
    assert health(base)["cancelled"] - before >= 2 * MAX_QUEUE
    assert base.client().completions.create(model=None, prompt="A", max_tokens=3).choices[0].text


def test_stop_holds_back_a_possible_stop_and_never_cuts_a_character():
    """Choice over a byte-level BPE, whose tokens split multi-byte characters: fed one token at a time, the text
    never shows half a character, and a stop string spread over tokens is cut out."""
    import serve
    text = "naïve café ✓ déjà vu, ✓✓ fin"
    tokenizer = build_tokenizer("bpe", 300, [text * 3])
    ids = encode(tokenizer, text)
    for stops, said in (([], text), (["✓✓"], "naïve café ✓ déjà vu, "), (["vu,", "é ✓"], "naïve caf")):
        choice = serve.Choice(0, tokenizer, False, stops, (tokenizer.eos_token_id,))
        pieces = [t for i, token in enumerate(ids) if not choice.finish
                  for _, t in choice.feed(token, i == len(ids) - 1)]
        assert "".join(pieces) == said and not any("\ufffd" in p for p in pieces)
        assert choice.finish == ("stop" if stops else "length")


# ----------------------------------------------------------------------------- a chat model

@pytest.fixture(scope="module")
def chat(chat_run, tmp_path_factory):
    server = Server(chat_run, tmp_path_factory.mktemp("serve"), "--max_batch", MAX_BATCH)
    yield server
    server.stop()


def chat_alone(chat_run, messages, max_tokens):
    """((thinking, answer), number of tokens) that `engine.generate` gives alone, greedy: the thinking is the text
    between the first THINK and END_THINK, the answer the text after, special tokens dropped (as the format's
    newlines at the edges)."""
    model, tokenizer = load_checkpoint(chat_run, "cpu", "fp32")
    think, end_think, end = tokenizer.convert_tokens_to_ids([THINK, END_THINK, IM_END])
    ids = list(generate(model, render_prompt(tokenizer, messages), max_tokens, temperature=0, eos_id=end))
    split = ids.index(end_think) if end_think in ids else -1
    thinking = ids[ids.index(think) + 1:split] if think in ids[:split] else []
    return (decode(tokenizer, thinking).strip("\n"), decode(tokenizer, ids[split + 1:]).strip("\n")), len(ids)


def test_chat_thinking_comes_apart_streamed_or_whole(chat, chat_run):
    messages = [{"role": "user", "content": "What is 12 + 9?"}]
    (thinking, answer), n = chat_alone(chat_run, messages, 60)
    client = chat.client()
    whole = client.chat.completions.create(model=None, messages=messages, max_tokens=60, temperature=0)
    message = whole.choices[0].message
    assert (message.reasoning_content, message.content, whole.usage.completion_tokens) == (thinking, answer, n)
    assert thinking and whole.choices[0].finish_reason == ("stop" if n < 60 else "length")
    chunks = list(client.chat.completions.create(model=None, messages=messages, max_tokens=60, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage == whole.usage
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == thinking
    assert "".join(d.content or "" for d in deltas) == answer
    status, body = post(chat.url + "/v1/chat/completions", {"messages": []})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = post(chat.url + "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]})
    assert status == 400 and body["error"]["param"].startswith("messages.0")


class Chromium:
    """Headless Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe: commands go in on fd 3 and
    answers come out on fd 4, as JSON ended by NUL), so no driver package and no browser download is needed."""

    def __init__(self, url, profile):
        to_browser, self.out = os.pipe()
        self.inp, from_browser = os.pipe()
        # the shell puts the pipe ends on fds 3 and 4 for Chromium (no preexec_fn in a process with threads)
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}',
                                      shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
                                      "--disable-dev-shm-usage", "--remote-debugging-pipe",
                                      f"--user-data-dir={profile}", "--window-size=900,700", url],
                                     pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self.ids, self.buffer, self.session = iter(range(1, 1 << 30)), b"", None
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def call(self, method, **params):
        n = next(self.ids)
        message = {"id": n, "method": method, "params": params, **({"sessionId": self.session} if self.session else {})}
        os.write(self.out, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                assert select.select([self.inp], [], [], 30)[0], f"Chromium did not answer {method}"
                self.buffer += os.read(self.inp, 1 << 20)
            raw, _, self.buffer = self.buffer.partition(b"\0")
            answer = json.loads(raw)
            if answer.get("id") == n:
                assert "error" not in answer, answer
                return answer["result"]

    def js(self, expression):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait(self, expression, seconds=30):
        wait_until(lambda: self.js(f"!!({expression})"), seconds)  # a DOM node comes back as {}: falsy

    def close(self):
        self.proc.terminate()  # its helper processes leave with it
        self.proc.wait(10)
        os.close(self.out)
        os.close(self.inp)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_page_streams_a_chat_in_chromium(chat, chat_run, tmp_path):
    (thinking, answer), _ = chat_alone(chat_run, [{"role": "user", "content": "What is 7 + 5?"}], 80)
    browser = Chromium(chat.url + "/", tmp_path / "profile")
    try:
        browser.wait("document.getElementById('model').textContent.includes('chat model')")
        browser.js("for (const [id, v] of [['temperature', 0], ['max-tokens', 80]]) {"
                   "  const e = document.getElementById(id); e.value = v; e.dispatchEvent(new Event('change')); }")
        for n, question in enumerate(("What is 7 + 5?", "And 30 + 4?"), 1):
            browser.js("document.getElementById('input').focus()")
            browser.call("Input.insertText", text=question)  # typed, then Enter
            for kind in ("keyDown", "keyUp"):
                browser.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)
            browser.wait(f"document.querySelectorAll('.assistant.done').length == {n}")
            if n == 1:
                assert browser.js("document.querySelector('.user').textContent") == question
                assert browser.js("document.querySelector('.assistant .answer').textContent") == answer
                assert browser.js("document.querySelector('.thinking div').textContent") == thinking
                assert browser.js("document.querySelector('.thinking').open") is True  # collapsible, open at first
                assert "tokens" in browser.js("document.querySelector('.meta').textContent")
        # the second turn fits the context of 128 once the page drops the first exchange from what it sends
        assert browser.js("document.querySelectorAll('.error').length") == 0
        shot = browser.call("Page.captureScreenshot")["data"]
        (tmp_path / "page.png").write_bytes(base64.b64decode(shot))
        browser.js("document.getElementById('new-chat').click()")
        assert browser.js("document.querySelectorAll('.msg').length") == 0
    finally:
        browser.close()


# ----------------------------------------------------------------------------- the command line

def test_bad_command_lines_are_one_line_errors(tmp_path, trained_run):
    assert_one_line_error(run_script("serve.py", "--out_dir", tmp_path / "nothing", "--port", "0", env=ENV),
                          "no run folder")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = run_script("serve.py", "--out_dir", trained_run, "--port", taken.getsockname()[1], env=ENV)
    assert_one_line_error(proc, "cannot listen on 127.0.0.1")


def test_sigterm_stops_the_server_cleanly_mid_answer(trained_run, tmp_path):
    server = Server(trained_run, tmp_path)
    sock = open_stream(server, "/v1/completions", {"prompt": "ROMEO:", "n": 8, "ignore_eos": True, "stream": True})
    start = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - start < 15
    sock.close()
