"""The HTTP server, driven by the official openai client and by raw HTTP: OpenAI's answers for
completions and chat, streamed text == non-streamed text, characters never cut, stop strings never
shown, n > 1, logprobs, seeds, concurrent requests batched without changing their text, OpenAI's
error JSON with the right status for every bad request, and the playground in a real browser."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from gradlm.text.chat import encode_chat
from gradlm.cli import main
from gradlm.generation.engine import Engine
from gradlm.generation.generate import LM
from gradlm.serving.serve import create_app
from gradlm.serving.webserver import listen

from conftest import CYCLE, cycle_model, write_run

NAME = "cycle"


@contextlib.contextmanager
def live(app):
    """Serve app on a free local port in a thread; yields its base URL."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(400):
        if server.started:
            break
        time.sleep(0.025)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def lm(tok):
    """Greedy text from "H" is exactly CYCLE[1:] + CYCLE + ...; sampled text varies (see cycle_model)."""
    return LM(cycle_model(tok), tok)


@pytest.fixture(scope="module")
def engine(lm):
    engine = Engine(lm.model, lm.tok, max_batch=16)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def url(lm, engine):
    with live(create_app(lm, NAME, engine=engine)) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def greedy(lm, n_tokens: int) -> str:
    return lm.generate("H", max_new_tokens=n_tokens, temperature=0)


def streamed_text(stream, chat: bool = False) -> tuple[list[str], str | None]:
    """The text pieces of a stream (one choice) and its finish reason."""
    pieces, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            text = (c.delta.content if chat else c.text) or ""
            if text:
                pieces.append(text)
            finish = c.finish_reason or finish
    return pieces, finish


# ---- completions and chat through the openai client -------------------------------------------------------


def test_models_health_and_a_greedy_completion(client, http, lm):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    assert http.get("/health").json()["status"] == "ok"
    r = client.completions.create(model=NAME, prompt="H", max_tokens=12, temperature=0)
    assert r.model == NAME and r.object == "text_completion" and r.id.startswith("cmpl-") and r.created > 0
    assert r.choices[0].text == greedy(lm, 12) and r.choices[0].text.startswith(CYCLE[1:])
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (1, 12, 13)


@pytest.mark.parametrize("stop", [["é!"], "🙂é", ["x", "!H"], ["🙂X"]])
def test_stop_strings_are_never_shown_streamed_or_not(client, lm, stop):
    full = greedy(lm, 20)
    first = min((full.find(s) for s in ([stop] if isinstance(stop, str) else stop) if s in full), default=-1)
    want = full[:first] if first >= 0 else full
    r = client.completions.create(model=NAME, prompt="H", max_tokens=20, temperature=0, stop=stop)
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == ("stop" if first >= 0 else "length")
    pieces, finish = streamed_text(
        client.completions.create(model=NAME, prompt="H", max_tokens=20, temperature=0, stop=stop, stream=True)
    )
    assert "".join(pieces) == want and finish == r.choices[0].finish_reason


def test_a_character_cut_across_tokens_arrives_whole(client, http):
    pieces = http.post("/tokenize", json={"text": "🙂"}).json()["pieces"]
    assert pieces == ["bytes:\\xf0", "bytes:\\x9f", "bytes:\\x99", "bytes:\\x82"]  # four tokens, one byte each
    stream = client.completions.create(model=NAME, prompt="H", max_tokens=9, temperature=0, stream=True, logprobs=1)
    texts, tokens = [], []
    for chunk in stream:
        texts.append(chunk.choices[0].text)
        tokens += chunk.choices[0].logprobs.tokens
    assert "".join(texts) == "i 🙂é!" and "🙂" in texts and "é" in texts
    assert not any("\ufffd" in t for t in texts)
    assert tokens[2:6] == pieces  # the tokens' logprobs still come one by one, as bytes


def test_streamed_equals_non_streamed_for_the_same_seed(client):
    settings = {"model": NAME, "max_tokens": 30, "temperature": 1.0, "top_p": 0.95, "seed": 11, "stop": ["!"]}
    r = client.completions.create(prompt="H", **settings)
    pieces, finish = streamed_text(client.completions.create(prompt="H", stream=True, **settings))
    assert "".join(pieces) == r.choices[0].text and finish == r.choices[0].finish_reason
    messages = [{"role": "user", "content": "Hi"}]
    c = client.chat.completions.create(messages=messages, **settings)
    pieces, finish = streamed_text(
        client.chat.completions.create(messages=messages, stream=True, **settings), chat=True
    )
    assert "".join(pieces) == c.choices[0].message.content and finish == c.choices[0].finish_reason
    assert c.choices[0].message.role == "assistant" and c.object == "chat.completion"


def test_seeds_reproduce_and_n_samples_draw_from_seed_plus_index(client):
    def texts(prompt, seed, n=1):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=1.0, seed=seed, n=n)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    three = texts("H", 5, n=3)
    assert len(three) == 3 and len(set(three)) == 3
    assert three == texts("H", 5, n=3)  # same seed, same text
    assert three == [texts("H", 5 + i)[0] for i in range(3)]
    # A list of prompts: choice p * n + j is sample j of prompt p.
    r = client.completions.create(model=NAME, prompt=["H", "é"], max_tokens=10, temperature=1.0, seed=2, n=2)
    got = {c.index: c.text for c in r.choices}
    assert got == {0: _one(client, "H", 2), 1: _one(client, "H", 3), 2: _one(client, "é", 2), 3: _one(client, "é", 3)}
    assert r.usage.prompt_tokens == 1 + 2 and r.usage.completion_tokens == 40


def _one(client, prompt: str, seed: int) -> str:
    return (
        client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=1.0, seed=seed).choices[0].text
    )


def test_logprobs_are_the_models_own_before_sampling_filters(client, lm):
    r = client.completions.create(
        model=NAME, prompt="H", max_tokens=6, temperature=0.7, seed=0, logprobs=3, extra_body={"top_k": 3}
    )
    lp = r.choices[0].logprobs
    ids = lm.tok.encode("H") + lp.model_extra["token_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(lm.model(torch.tensor([ids]))[0].float(), -1)
    for k, (token, value, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        row = ref[k]
        assert value == pytest.approx(float(row[ids[k + 1]]), abs=1e-4)
        assert sorted(top.values(), reverse=True) == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    assert lp.text_offset == [0, 1, 2, 2, 2, 2]  # 🙂's bytes start where the character does
    c = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = c.choices[0].logprobs.content
    assert bytes(b for t in content for b in t.bytes).decode() == c.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob for t in content)


def test_special_token_text_in_a_request_stays_text(client, lm):
    text = "<|endoftext|><|user|>hi<|end|>"
    r = client.completions.create(model=NAME, prompt=text, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == len(lm.tok.encode(text)) > 5  # spelled out character by character
    messages = [{"role": "system", "content": "be <|assistant|>"}, {"role": "user", "content": text}]
    c = client.chat.completions.create(model=NAME, messages=messages, max_tokens=1, temperature=0)
    ids = encode_chat(lm.tok, messages)
    assert c.usage.prompt_tokens == len(ids)
    specials = set(lm.tok.specials.values())
    assert sum(i in specials for i in ids) == 1 + 2 * 2 + 1  # <|endoftext|>, a role and <|end|> per turn, <|assistant|>


def test_include_usage_and_the_chat_stream_shape(http):
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_concurrent_requests_are_batched_and_write_what_they_would_alone(client, engine):
    def one(seed):
        r = client.completions.create(
            model=NAME, prompt="Hi" if seed % 2 else "H", max_tokens=20 + seed, temperature=1.0, seed=seed
        )
        return r.choices[0].text, r.usage.completion_tokens

    alone = [one(s) for s in range(8)]
    before = engine.stats()
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, range(8)))
    after = engine.stats()
    assert together == alone
    steps, tokens = after["steps"] - before["steps"], after["tokens"] - before["tokens"]
    assert tokens == sum(n for _, n in together) and steps < tokens  # several rows per step


# ---- errors ------------------------------------------------------------------------------------------------

BAD = [
    ({"prompt": "H", "temperature": -1}, 400, "temperature", "temperature"),
    ({"prompt": "H", "top_p": 0}, 400, "top_p", "top_p"),
    ({"prompt": "H", "n": 0}, 400, "n", "n"),
    (
        {"prompt": "H", "max_tokens": 64},
        400,
        "max_tokens",
        "65 tokens (1 in the prompt + 64 max_tokens), more than the context window of 64",
    ),
    ({"prompt": "H" * 70}, 400, "prompt", "70 tokens long; the context window is 64"),
    ({"prompt": [1, 2]}, 400, "prompt", "string or a non-empty list of strings"),
    ({"prompt": "H", "stop": ["!", ""]}, 400, "stop", "must not be empty"),
    ({"prompt": "H", "logit_bias": {"5": 1}}, 400, "logit_bias", "not supported"),
    ({"prompt": "H", "logprobs": 50}, 400, "logprobs", "logprobs"),
    ({"max_tokens": 3}, 400, "prompt", "prompt is required"),
    ({"prompt": "H", "model": "gpt-4"}, 404, "model", "no model 'gpt-4'"),
    ([1, 2], 400, None, "JSON object"),
]


@pytest.mark.parametrize("body, status, param, message", BAD)
def test_bad_completion_requests_get_openai_errors(http, body, status, param, message):
    r = http.post("/v1/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and message in err["message"]


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "robot", "content": "hi"}], "has role 'robot'"),
        ([{"role": "user"}], "content"),
        ([], "non-empty list"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text only"),
    ],
)
def test_bad_chat_requests_get_openai_errors(http, messages, message):
    r = http.post("/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and message in r.json()["error"]["message"]


def test_transport_errors_are_openai_json_too(http, client):
    r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = http.post(
        "/v1/completions", content=b'{"prompt": "H"}', headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]
    assert (
        http.get("/v1/nothing").status_code == 404
        and "no such endpoint" in http.get("/v1/nothing").json()["error"]["message"]
    )
    assert http.get("/v1/completions").status_code == 405 and "error" in http.get("/v1/completions").json()
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    r = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunked = http.post("/v1/completions", content=iter([b'{"prompt": "'] + [b"a" * 65536] * 40 + [b'"}']))
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=NAME, prompt="H", temperature=-2)
    with pytest.raises(openai.NotFoundError, match="no model 'nope'") as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"


def test_api_key(lm, monkeypatch):
    with live(create_app(lm, NAME, api_key="s3cret", max_batch=2)) as u, httpx.Client(base_url=u, timeout=30) as h:
        assert h.get("/v1/models").status_code == 401
        r = h.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert h.post("/tokenize", json={"text": "x"}).status_code == 401
        assert h.get("/health").json()["auth"] is True and h.get("/").status_code == 200  # the page asks for the key
        ok = openai.OpenAI(base_url=u + "/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model=NAME, prompt="H", max_tokens=2, temperature=0).choices[0].text == "i "
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=u + "/v1", api_key="nope", max_retries=0).models.list()


def test_a_full_queue_answers_503_and_a_client_that_leaves_frees_its_slot(lm):
    """An engine stepped by hand (not started): one row of batch, one request of queue."""
    engine = Engine(lm.model, lm.tok, max_batch=1, max_queue=1)
    body = {"prompt": "H", "max_tokens": 60, "temperature": 0, "stream": True}

    def wait_for(condition):
        for _ in range(400):
            if condition():
                return
            time.sleep(0.025)
        raise AssertionError("timed out")

    with live(create_app(lm, NAME, engine=engine)) as u, httpx.Client(base_url=u, timeout=30) as h:
        with h.stream("POST", "/v1/completions", json=body) as first:
            wait_for(lambda: engine.stats()["waiting"] == 1)
            engine.step()  # admitted, first token
            lines = first.iter_lines()
            assert json.loads(next(lines).removeprefix("data: "))["choices"][0]["text"] == "i"
            with h.stream("POST", "/v1/completions", json=body):  # the second waits in the queue
                wait_for(lambda: engine.stats()["waiting"] == 1)
                busy = h.post("/v1/completions", json=body)
                assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
                assert busy.json()["error"]["code"] == "overloaded"
            wait_for(lambda: engine.stats()["waiting"] == 0)  # the second client left: out of the queue at once
        running = engine._rows[0].handle
        wait_for(lambda: running.cancelled)  # the first client left
        engine.step()
        assert engine.stats()["running"] == 0 and engine.stats()["tokens"] == 1
        # A client waiting for a whole (non-streamed) answer that gives up leaves the queue at once too.
        with ThreadPoolExecutor(1) as pool:
            gave_up = pool.submit(h.post, "/v1/completions", json=dict(body, stream=False), timeout=1.0)
            wait_for(lambda: engine.stats()["waiting"] == 1)
            with pytest.raises(httpx.ReadTimeout):
                gave_up.result()
        wait_for(lambda: engine.stats()["waiting"] == 0)


# ---- the command -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, lm):
    return write_run(tmp_path_factory.mktemp("serve") / "cyclerun", lm.model, lm.tok)


def test_cli_serve_answers_and_stops(run_dir):
    env = dict(os.environ, GRADLM_API_KEY="k")
    proc = subprocess.Popen(
        # --compile off: no background build of the compiled step (tests/test_aot.py covers it) outliving the test
        [sys.executable, "-m", "gradlm", "serve", str(run_dir), "--port", "0", "--compile", "off"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert select.select([proc.stdout], [], [], 120)[0], "the server printed nothing in 2 minutes"
        line = proc.stdout.readline()  # "serving cyclerun (...) at http://127.0.0.1:PORT/ ..."
        assert line.startswith("serving cyclerun") and "API key required" in line, line + proc.stderr.read()
        base = line.split(" at ")[1].split("/ ")[0]
        r = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer k"}, timeout=30)
        assert r.json()["data"][0]["id"] == "cyclerun"
    finally:
        proc.terminate()
        proc.wait(30)


def test_cli_serve_mistakes_are_one_line(run_dir, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: no run directory")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(run_dir), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot listen on 127.0.0.1:") and err.count("\n") == 1


def test_inspect_answers_what_gradlm_inspect_computes_and_refuses_bad_requests(http, lm):
    from gradlm.evaluation.inspection import inspect_text

    got = http.post("/inspect", json={"text": "HELLO", "top": 3, "lens": True}).json()
    want = inspect_text(lm.model, lm.tok, "HELLO", k=3, lens=True)
    assert got["tokens"] == want["tokens"] and got["next"] == want["next"] and got["lens"] == want["lens"]
    att, ref = torch.tensor(got["attention"]), torch.tensor(want["attention"])
    assert att.shape == ref.shape == (lm.model.cfg.n_layer, lm.model.cfg.n_head, len(want["ids"]), len(want["ids"]))
    assert torch.allclose(att, ref, atol=5e-5)  # rounded to 4 decimals
    assert "lens" not in http.post("/inspect", json={"text": "HELLO"}).json()
    for body, says in (({"text": ""}, "the text is empty"), ({"text": "H", "top": 0}, "top must be between 1 and 20")):
        r = http.post("/inspect", json=body)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(says), r.text


# ---- the playground, in a real browser ---------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium); .ci/run installs it")
def test_playground_generates_tokens_with_probabilities_and_alternatives(url, tmp_path):
    from playwright.sync_api import sync_playwright

    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    shot = Path(os.environ.get("GRADLM_SCREENSHOT") or tmp_path / "playground.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            elsewhere, console_errors = [], []  # the page works offline: it asks nothing of any other origin
            page.on("request", lambda r: elsewhere.append(r.url) if not r.url.startswith(url) else None)
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('cycle')", timeout=10_000)
            page.fill("#prompt", "H")
            page.fill("#max_tokens", "24")
            page.fill("#seed", "4")
            page.click("#generate")
            page.wait_for_function(
                "document.getElementById('cstatus').textContent.startsWith('finished')", timeout=20_000
            )
            tokens = page.locator("#cout .tok")
            assert tokens.count() >= 20
            assert page.locator("#cout .pending").inner_text() == ""
            shade = tokens.first.evaluate("el => getComputedStyle(el).backgroundColor")
            assert shade.startswith("rgb") and shade != "rgba(0, 0, 0, 0)"
            tokens.first.hover()
            tip = page.locator("#tip")
            assert tip.is_visible()
            assert "id " in tip.inner_text() and "%" in tip.inner_text() and tip.locator("tr").count() >= 5
            assert "before" in page.locator("#probnote").inner_text()
            page.screenshot(path=str(shot))
            page.click("nav button[data-tab=tokenize]")
            page.fill("#ttext", "acetominophen 🙂")
            page.wait_for_function(
                "document.getElementById('tstats').textContent.includes('for 18 bytes')", timeout=10_000
            )
            boxes = page.locator("#tout .piece")
            assert boxes.count() == len(httpx.post(url + "/tokenize", json={"text": "acetominophen 🙂"}).json()["ids"])
            assert boxes.last.inner_text().split() == ["\\x82", "130"]  # the last byte of 🙂, and its id
            page.click("nav button[data-tab=inspect]")
            page.fill("#itext", "HELLO")
            page.click("#inspectbtn")
            page.wait_for_function("document.getElementById('istatus').textContent.includes('heads')", timeout=10_000)
            views = httpx.post(url + "/inspect", json={"text": "HELLO"}).json()
            assert page.locator("#itoks .piece").count() == len(views["tokens"])
            assert page.locator("#inext tr").count() == 5  # the "alternatives shown" setting
            page.locator("#itoks .piece").first.click()  # the first token becomes the query: it reads only itself
            assert page.locator("#itoks .query").count() == 1 and page.locator("#inext tr").count() == 5
            assert page.locator("#ilayer option").count() == len(views["attention"])
            assert page.locator("#imap").evaluate("c => c.width") > 0
            assert not elsewhere and not console_errors, (elsewhere, console_errors)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000


# ---- one engine: every entry point decodes alike -----------------------------------------------------------

ANSWER = "Ok, 20 mg."


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tok):
    """A chat-tuned run (it has a chat template) whose model answers ANSWER and then <|end|>: greedy decoding
    cycles <|assistant|> ANSWER <|end|> <|user|> <|assistant|> ... (see cycle_model)."""
    from gradlm.text.chat import chat_ids, write_chat_template

    ids = chat_ids(tok)
    m = cycle_model(tok, ids=[ids["assistant"], *tok.encode(ANSWER), ids["end"], ids["user"]])
    d = write_run(tmp_path_factory.mktemp("chatrun") / "chatrun", m, tok)
    write_chat_template(d)
    return d


def test_chat_qa_cli_and_server_give_the_same_greedy_text(chat_run, tok, capsys):
    from gradlm.evaluation.evaluate import QAItem, score_qa
    from gradlm.generation.generate import load
    from gradlm.model.sampling import SamplingConfig
    from gradlm.generation.session import ChatSession

    lm = load(chat_run)
    question = "Dose of zorvastatin?"
    chat = "".join(ChatSession(lm, sampling=SamplingConfig(temperature=0, max_new_tokens=20)).send(question))
    qa = score_qa(
        lm.model, lm.tok, [QAItem([{"role": "user", "content": question}], ANSWER, "train", "q1")], max_new_tokens=20
    ).predictions[0]["got"]
    template = tok.decode(encode_chat(tok, [{"role": "user", "content": question}]))  # the same ids, typed
    assert (
        main(["generate", str(chat_run), template, "--allow-special", "--temperature", "0", "--max-new-tokens", "20"])
        == 0
    )
    cli = capsys.readouterr().out.removesuffix("\n")
    with live(create_app(lm, NAME)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=20
        )
        server = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
    assert chat == qa == cli == server == ANSWER


def test_completions_on_a_chat_tuned_run_stop_at_end_and_never_show_special_tokens(chat_run, tok):
    """The fault: /v1/completions printed '<|end|> statin<|end|>20 mg<|end|> ...'."""
    from gradlm.generation.generate import LM, load

    lm = load(chat_run)
    first = tok.decode(tok.encode(ANSWER)[:1])  # a prompt inside the answer: the model finishes it, then <|end|>
    with live(create_app(lm, NAME)) as url:
        r = httpx.post(
            url + "/v1/completions", json={"prompt": first, "max_tokens": 30, "temperature": 0}, timeout=60
        ).json()
    assert r["choices"][0]["text"] == ANSWER[len(first) :] and r["choices"][0]["finish_reason"] == "stop"
    assert lm.generate(first, temperature=0, max_new_tokens=30) == ANSWER[len(first) :]
    # The same model read as a base model (no chat template) runs on past <|end|>, and still never
    # writes a special token as text: it continues with the answer again.
    base = LM(lm.model, tok).complete(first, temperature=0, max_new_tokens=30)[0]
    assert (
        "<|" not in base.text and base.text.startswith(ANSWER[len(first) :] + ANSWER) and base.finish_reason == "length"
    )
    assert tok.specials["<|end|>"] in base.token_ids


def test_chat_refuses_a_message_longer_than_the_context_window(chat_run, tok):
    """The fault: `gradlm chat` answered a too-long message after silently cutting it; `generate` refuses."""
    from gradlm.errors import ConfigError
    from gradlm.generation.generate import load
    from gradlm.generation.session import ChatSession

    lm = load(chat_run)
    long = "zorvastatin " * lm.context_window
    with pytest.raises(ConfigError, match="context window"):
        list(ChatSession(lm).send(long))
    with pytest.raises(ConfigError, match="context window"):
        lm.generate(long)
    out = subprocess.run(
        [sys.executable, "-m", "gradlm", "chat", str(chat_run), "--temperature", "0", "--compile", "off"],
        input=long + "\nHi\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "context window" in out.stderr and "Traceback" not in out.stderr
    assert out.stdout.strip() == ANSWER  # only the second message was answered
