"""gradlm watch: tailing files that training writes, the server-sent event stream, and the page in Chromium.

The page tests append lines the way training does (one write of one line, flushed) and rewrite files the way
a resume does (a new file renamed over the old), then count the points the charts hold (window.gradlmWatch)
rather than pixels.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from gradlm.errors import ConfigError
from gradlm.serving.watch import JsonLines, Story, Watcher, check_sources, create_app, run_names, run_status
from gradlm.serving.webserver import sse

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium); .ci/run installs it"
)
TIMEOUT_MS = 15_000


# ---- files as training writes them -------------------------------------------------------------------------


def append(path: Path, *rows: dict) -> None:
    """Rows appended as training writes them: each one write of one line, flushed."""
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            f.flush()


def rewrite(path: Path, rows: list[dict]) -> None:
    """The file replaced as a resume does: a new file renamed over the old one (a new inode)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def step_row(step: int, loss: float = 5.0, **extra) -> dict:
    return {
        "step": step,
        "tokens": 512 * step,
        "time": round(0.05 * step, 3),
        "epoch": step / 800,
        "lr": 1e-3,
        "loss": loss,
        "grad_norm": 0.5,
        "tokens_per_s": 10240.0,
        **extra,
    }


def eval_row(step: int, val_loss: float, best: bool = True) -> dict:
    return {
        "step": step,
        "tokens": 512 * step,
        "time": round(0.05 * step, 3),
        "epoch": step / 800,
        "val_loss": val_loss,
        "val_bpb": val_loss / 1.7,
        "train_eval_loss": val_loss - 0.05,
        "gap": 0.05,
        "best": best,
    }


def event_row(step: int, kind: str, message: str, **extra) -> dict:
    return {
        "step": step,
        "tokens": 512 * step,
        "time": round(0.05 * step, 3),
        "event": kind,
        "message": message,
        **extra,
    }


def make_run(path: Path, config: dict, steps: range, loss0: float = 7.0, lr_muon: bool = False) -> Path:
    """A synthesized run directory: a real run's config.json and realistic metrics rows."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    rows = []
    for s in steps:
        rows.append(step_row(s, loss0 * 0.995**s + 1.5, **({"lr_muon": 0.02} if lr_muon else {})))
        if s % 20 == 0:
            rows.append(eval_row(s, loss0 * 0.995**s + 1.6))
    append(path / "metrics.jsonl", *rows)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file) -> Path:
    """A tiny real run, trained once by the CLI: its config.json, metrics, summary (and samples, when training writes
    them)."""
    out = tmp_path_factory.mktemp("watch") / "tiny"
    env = {**os.environ, "GRADLM_CACHE": str(tmp_path_factory.mktemp("cache"))}
    args = [
        "train",
        "--data",
        text_file,
        "--out",
        out,
        "--max-steps",
        40,
        "--eval-every",
        20,
        "--log-every",
        5,
        "--n-layer",
        1,
        "--d-model",
        32,
        "--n-head",
        2,
        "--block-size",
        32,
        "--batch",
        4,
        "--vocab-size",
        300,
        "--no-progress",
        "--no-plots",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "gradlm", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def config(trained) -> dict:
    return json.loads((trained / "config.json").read_text())


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- tailing ----------------------------------------------------------------------------------------------------


def test_appended_lines_arrive_once_each_and_a_half_written_line_waits(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = JsonLines(path)
    assert tail.poll() is None  # not there yet
    append(path, step_row(1), step_row(2))
    assert tail.poll() == (False, [step_row(1), step_row(2)])
    assert tail.poll() is None
    line = json.dumps(step_row(3)) + "\n"
    with open(path, "a") as f:
        f.write(line[:20])  # training is in the middle of writing this line
    assert tail.poll() is None
    with open(path, "a") as f:
        f.write(line[20:])
    assert tail.poll() == (False, [step_row(3)])
    with open(path, "a") as f:
        # NaN becomes null; lines that are not objects are skipped
        f.write('{"step": 4, "loss": NaN}\nnot json\n[1, 2]\n')
    assert tail.poll() == (False, [{"step": 4, "loss": None}])


def test_a_replaced_or_shrunk_file_is_read_again_from_its_start(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = JsonLines(path)
    append(path, *[step_row(s) for s in range(1, 6)])
    assert len(tail.poll()[1]) == 5
    # resume: rows after the checkpoint dropped, a new file renamed into place
    rewrite(path, [step_row(1), step_row(2)])
    assert tail.poll() == (True, [step_row(1), step_row(2)])
    append(path, step_row(3))
    assert tail.poll() == (False, [step_row(3)])
    path.write_text(json.dumps(step_row(9, loss=1.0)) + "\n")  # rewritten in place (same inode), shorter
    assert tail.poll() == (True, [step_row(9, loss=1.0)])
    path.write_text("".join(json.dumps(step_row(s, loss=2.0)) + "\n" for s in range(1, 4)))  # in place, longer
    assert tail.poll() == (True, [step_row(s, loss=2.0) for s in range(1, 4)])
    path.unlink()
    assert tail.poll() == (True, [])
    assert tail.poll() is None


def test_status_from_the_files(tmp_path):
    def status(rows, summary=None, config=True):
        story = Story()
        for r in rows:
            story.add(r)
        return run_status(config, story, summary)

    done = {"stop": "budget", "steps": 40}
    assert status([], config=False)["state"] == "waiting"
    assert status([])["state"] == "starting"
    assert status([step_row(10)])["state"] == "running"
    assert status([step_row(40)], done) == {"state": "finished", "reason": "budget", "message": None}
    stopped = event_row(40, "stopped", "the budget of 40 steps is spent", reason="budget")
    assert status([step_row(40), stopped]) == {
        "state": "finished",
        "reason": "budget",
        "message": "the budget of 40 steps is spent",
    }
    # resumed: the summary (and the stop) are the previous training's until it ends again
    resumed = event_row(40, "resumed", "resumed from step 40")
    assert status([step_row(40), stopped, resumed], done)["state"] == "running"
    assert status([step_row(40), stopped, resumed, step_row(50)], done)["state"] == "running"
    assert (
        status([step_row(40), stopped, resumed, step_row(80), event_row(80, "stopped", "", reason="converged")], done)[
            "reason"
        ]
        == "converged"
    )
    # an older run (no events) training past its summary
    assert status([step_row(40), step_row(50)], done)["state"] == "running"
    assert (
        status([step_row(40), {"step": 30, "event": "diverged", "at_step": 35, "loss": None, "new_lr": 1e-4}], done)[
            "state"
        ]
        == "finished"
    )


def test_watcher_sends_everything_first_then_what_changes(tmp_path, config):
    run = make_run(tmp_path / "r", config, range(1, 11))
    w = Watcher(check_sources([str(run)]))
    first = w.poll()
    kinds = [e for e, _ in first]
    assert kinds[:3] == ["hello", "runs", "file"] and kinds[-1] == "status"
    assert [d["name"] for d in first[1][1]["runs"]] == ["r"]
    assert sum(len(d["rows"]) for e, d in first if e == "rows") == 10  # steps 1..10: no evaluation yet
    assert dict(first)["status"]["state"] == "running"
    assert w.poll() == []
    append(run / "metrics.jsonl", step_row(11))
    append(run / "samples.jsonl", {"step": 11, "tokens": 5632, "time": 0.5, "prompt": "ROMEO:", "text": " what light"})
    got = w.poll()
    assert [(d["file"], len(d["rows"])) for e, d in got if e == "rows"] == [("metrics", 1), ("samples", 1)]
    rewrite(run / "metrics.jsonl", [step_row(1), step_row(2)])
    got = w.poll()
    assert [e for e, _ in got][:2] == ["reset", "rows"] and got[1][1]["rows"] == [step_row(1), step_row(2)]
    (run / "summary.json").write_text(json.dumps({"stop": "budget", "steps": 2}))
    got = dict(w.poll())
    assert got["file"]["file"] == "summary" and got["status"]["state"] == "finished"
    text = sse({"run": "r0", "rows": [{"loss": float("nan")}]}, event="rows")
    assert text.startswith("event: rows\ndata: ") and text.endswith("\n\n")
    assert json.loads(text.split("data: ", 1)[1], parse_constant=lambda c: pytest.fail(c)) == {
        "run": "r0",
        "rows": [{"loss": None}],
    }


def test_a_comparison_shows_each_run_as_it_appears(tmp_path, config):
    cmp = tmp_path / "cmp"
    make_run(cmp / "optimizer-sgd", config, range(1, 6))
    w = Watcher(check_sources([str(cmp)]))
    assert [r["name"] for r in dict(w.poll())["runs"]["runs"]] == ["optimizer-sgd"]
    (cmp / "optimizer-adamw").mkdir()  # created, but nothing in it yet: not a run
    assert not any(e == "runs" for e, _ in w.poll())
    make_run(cmp / "optimizer-adamw", config, range(1, 3))
    got = w.poll()
    runs = dict(got)["runs"]["runs"]
    assert [(r["name"], r["group"], r["color"]) for r in runs] == [
        ("optimizer-sgd", "g0", 0),
        ("optimizer-adamw", "g0", 1),
    ]
    assert [len(d["rows"]) for e, d in got if e == "rows" and d["run"] == "r1"] == [2]
    (cmp / "compare.json").write_text(
        json.dumps({"budget": "budget: max steps 5", "runs": [{"label": "optimizer=sgd", "status": "ok"}]})
    )
    assert dict(w.poll())["file"] == {
        "group": "g0",
        "file": "compare",
        "data": {"budget": "budget: max steps 5", "runs": [{"label": "optimizer=sgd", "status": "ok"}]},
    }


def test_wait_accepts_a_run_before_training_creates_it(tmp_path, config):
    later = tmp_path / "later"
    with pytest.raises(ConfigError, match="add --wait"):
        check_sources([str(later)])
    w = Watcher(check_sources([str(later)], wait=True))
    got = dict(w.poll())
    assert got["runs"]["runs"][0]["kind"] == "pending" and got["status"]["state"] == "waiting"
    later.mkdir()
    assert w.poll() == []  # an empty folder: still waiting
    (later / "config.json").write_text(json.dumps(config))
    got = dict(w.poll())
    assert got["runs"]["runs"][0]["kind"] == "run" and got["status"]["state"] == "starting"


def test_paths_that_are_not_runs_are_refused_with_one_message(tmp_path, capsys):
    from gradlm.cli import main

    with pytest.raises(ConfigError, match="no such run directory: /nonexistent/run"):
        check_sources(["/nonexistent/run"])
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match="notes.txt is a file"):
        check_sources([str(tmp_path / "notes.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty is not a run directory"):
        create_app([str(tmp_path / "empty")])
    assert main(["watch", "/nonexistent/run"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: no such run directory: /nonexistent/run")
        and err.count("\n") == 1
        and "Traceback" not in err
    )


def test_the_watcher_process_leaves_torch_alone(tmp_path, config):
    """The watcher starts light: the command's parser, the app and its socket read JSON and never need the model
    code (what `gradlm watch` and `train --watch` run, up to serving)."""
    run = make_run(tmp_path / "light", config, range(1, 3))
    code = (
        "import sys; from gradlm.cli import build_parser; from gradlm.serving import watch, webserver; "
        f"build_parser('watch').parse_args(['watch', {str(run)!r}]); watch.create_app([{str(run)!r}], "
        "hosts=webserver.LOCAL_NAMES); "
        "webserver.listen('127.0.0.1', 0); sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_runs_that_share_a_name_are_told_apart():
    assert run_names([Path("/a/x/run"), Path("/a/y/run"), Path("/a/z")]) == ["x/run", "y/run", "z"]
    assert run_names([Path("/a/x/run"), Path("/b/x/run")]) == ["/a/x/run", "/b/x/run"]


# ---- HTTP: the real command ---------------------------------------------------------------------------------


@contextlib.contextmanager
def command(*args: str):
    """`gradlm watch ARGS --port 0` in a subprocess: yields the URL its one line prints."""
    p = subprocess.Popen(
        [sys.executable, "-m", "gradlm", "watch", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = p.stdout.readline()
        assert line.startswith("watching "), line + p.stderr.read()
        url = line.split()[-1]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url), line
        yield url
    finally:
        p.terminate()
        p.wait(10)


def sse_events(response, wanted: set[str], limit_s: float = 10) -> list[tuple[str, dict]]:
    """Events read from a streaming response (or its iter_lines(), to read on later) until each name in wanted has
    come."""
    got, event, deadline = [], None, time.monotonic() + limit_s
    for line in response if hasattr(response, "__next__") else response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            got.append((event, json.loads(line[6:])))
            if wanted <= {e for e, _ in got}:
                return got
        assert time.monotonic() < deadline, got
    return got


def test_events_need_the_key_and_the_page_asks_nothing_of_other_origins(tmp_path, config):
    run = make_run(tmp_path / "keyed", config, range(1, 21))
    with command(str(run), "--api-key", "sekrit") as url:
        page = httpx.get(url)
        assert page.status_code == 200 and "gradlm watch" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        refs = re.findall(r'(?:src|href)="([^"]*)"', page.text)
        assert refs and all(not re.match(r"[a-z]+:|//", r) or r == "data:," for r in refs), refs
        for ref in refs:
            if not ref.startswith("data:"):
                assert httpx.get(url + ref).status_code == 200, ref
        assert httpx.get(url + "static/../watch.py").status_code == 404
        assert httpx.get(url + "static/vendor/uplot/LICENSE").status_code == 404
        for headers, params in [({}, {}), ({}, {"key": "wrong"}), ({"Authorization": "Bearer wrong"}, {})]:
            r = httpx.get(url + "events", headers=headers, params=params)
            assert r.status_code == 401 and "key" in r.json()["error"]["message"]
        for headers, params in [({}, {"key": "sekrit"}), ({"Authorization": "Bearer sekrit"}, {})]:
            with httpx.stream("GET", url + "events", headers=headers, params=params, timeout=10) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                got = sse_events(r, {"hello", "rows", "status"})
                assert sum(len(d["rows"]) for e, d in got if e == "rows") == 21  # 20 steps and an evaluation


def test_several_viewers_each_get_everything(tmp_path, config):
    run = make_run(tmp_path / "shared", config, range(1, 11))
    with command(str(run)) as url:
        with (
            httpx.stream("GET", url + "events", timeout=10) as ra,
            httpx.stream("GET", url + "events", timeout=10) as rb,
        ):
            a, b = ra.iter_lines(), rb.iter_lines()
            first, second = sse_events(a, {"hello", "rows", "status"}), sse_events(b, {"hello", "rows", "status"})
            append(run / "metrics.jsonl", step_row(11))
            more_a, more_b = sse_events(a, {"rows"}), sse_events(b, {"rows"})
    rows = lambda got: [r["step"] for e, d in got if e == "rows" for r in d["rows"]]  # noqa: E731
    assert rows(first) == rows(second) == list(range(1, 11))
    assert rows(more_a) == rows(more_b) == [11]  # each viewer is sent the new line, once


def test_a_local_watcher_answers_only_to_this_machines_names(tmp_path, config):
    """Without a key on 127.0.0.1, a request naming another host (a web page that points its own name at this
    port) gets 400, so the runs' text cannot leave the machine through a browser."""
    run = make_run(tmp_path / "local", config, range(1, 3))
    with command(str(run)) as url:
        assert httpx.get(url + "events", headers={"Host": "evil.example"}).status_code == 400
        assert httpx.get(url, headers={"Host": "evil.example"}).status_code == 400
        assert httpx.get(url).status_code == 200
        with httpx.stream("GET", url.replace("127.0.0.1", "localhost") + "events", timeout=10) as r:
            assert r.status_code == 200


def test_a_watcher_started_for_a_training_ends_when_the_training_dies(tmp_path, config):
    """--watch's watcher (--exit-with-parent) leaves no process holding the port when its parent is killed."""
    run = make_run(tmp_path / "orphan", config, range(1, 3))
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import subprocess, sys, time; "
                f"p = subprocess.Popen([sys.executable, '-m', 'gradlm', 'watch', {str(run)!r}, '--port', '0', "
                "'--exit-with-parent'], stdout=subprocess.PIPE, text=True); "
                "print(p.pid, p.stdout.readline().split()[-1], flush=True); time.sleep(600)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    pid, url = parent.stdout.readline().split()
    assert httpx.get(url).status_code == 200
    parent.kill()  # SIGKILL: no chance to stop its child
    parent.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(int(pid), 9)
        raise AssertionError("the watcher outlived the process that started it")


# ---- the page, in Chromium ----------------------------------------------------------------------------------


@contextlib.contextmanager
def live(paths: list[str], **kw):
    """The watcher's app on a free local port in a thread; yields (base URL, the uvicorn server)."""
    import uvicorn

    from gradlm.serving.webserver import listen

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(paths, **kw), log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/", server
    finally:
        stop(server)
        thread.join(10)


def stop(server) -> None:
    """Stop the watcher as Ctrl-C does: its streams end, then the server."""
    server.config.app.state.closing.set()
    server.should_exit = True


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
        yield b
        b.close()


@contextlib.contextmanager
def open_page(browser, url: str, width: int = 1200, height: int = 900, query: str = ""):
    """The page at url (+ query) that must ask nothing of any other origin and log no console error."""
    page = browser.new_page(viewport={"width": width, "height": height})
    elsewhere, errors = [], []
    page.on("request", lambda r: elsewhere.append(r.url) if not r.url.startswith(url) else None)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(url + query)
        yield page, errors
        assert not elsewhere and not errors, (elsewhere, errors)
    finally:
        page.close()


def until(page, predicate: str, arg=None) -> None:
    """Wait for a JS predicate, written as a function (the page's CSP forbids evaluating strings)."""
    page.wait_for_function(predicate, arg=arg, timeout=TIMEOUT_MS)


@needs_chromium
def test_the_page_follows_a_run_as_it_trains_and_rebuilds_on_resume(tmp_path, config, browser):
    run = make_run(tmp_path / "live", config, range(1, 4))
    with live([str(run)]) as (url, server), open_page(browser, url) as (page, errors):
        until(page, "() => gradlmWatch.pointCount('live', 'loss') === 3")
        assert page.locator("#status").get_attribute("data-state") == "running"
        assert page.locator("#settings").inner_text().count("adamw") == 1
        append(run / "metrics.jsonl", step_row(4, progress=0.1, eta_s=90.0))
        until(page, "() => document.getElementById('eta').textContent === '10% · 1m30s left'")
        append(run / "metrics.jsonl", step_row(5, loss=4.0), eval_row(5, 4.2))
        append(
            run / "metrics.jsonl",
            event_row(
                5,
                "diverged",
                "loss 41.0 at step 5: restored step 4, learning rate halved",
                at_step=5,
                loss=41.0,
                new_lr=5e-4,
            ),
        )
        append(run / "metrics.jsonl", event_row(5, "mystery", "a kind this page has never heard of"))
        untrusted = "<img src=x onerror=alert(1)> thou <b>art</b>"
        append(run / "samples.jsonl", {"step": 5, "tokens": 2560, "time": 0.25, "prompt": "ROMEO:", "text": untrusted})
        until(
            page,
            "() => gradlmWatch.pointCount('live', 'loss') === 5 && gradlmWatch.pointCount('live', 'val_loss') === 1",
        )
        until(
            page,
            "() => document.querySelectorAll('#events .event').length === 2 && document.querySelectorAll('#samples "
            ".sample').length === 1",
        )
        assert page.locator("#samples .sample .text").inner_text() == untrusted  # shown as text, never as markup
        assert page.locator("#samples img, #samples b").count() == 0
        assert page.locator("#samples .sample .prompt").inner_text() == "ROMEO:"
        assert [e.get_attribute("data-kind") for e in page.locator("#events .event").all()] == ["mystery", "diverged"]
        assert "restored step 4" in page.locator("#events").inner_text()
        assert "best checkpoint: step 5" in page.locator("#best").inner_text()
        assert gradlm_series(page, "lr") == ["lr"]
        append(run / "metrics.jsonl", step_row(6, lr_muon=0.02))  # a second parameter group's learning rate appears
        until(page, "() => gradlmWatch.series('lr').join() === 'lr,lr_muon'")

        # resume: the rows after the checkpoint (step 4) are dropped by a rewrite, then training appends again
        rewrite(
            run / "metrics.jsonl", [step_row(s) for s in range(1, 5)] + [event_row(4, "resumed", "resumed from step 4")]
        )
        rewrite(run / "samples.jsonl", [])
        until(page, "() => gradlmWatch.pointCount('live', 'loss') === 4 && gradlmWatch.rows('live', 'steps') === 4")
        until(
            page,
            "() => document.querySelectorAll('#events .event').length === 1 && document.querySelectorAll('#samples "
            ".sample').length === 0",
        )
        assert page.locator("#events .event").get_attribute("data-kind") == "resumed"
        assert gradlm_series(page, "lr") == ["lr"] and page.locator("#best").is_hidden()
        append(run / "metrics.jsonl", step_row(5, loss=3.0))
        until(page, "() => gradlmWatch.pointCount('live', 'loss') === 5")

        page.select_option("#xaxis", "time")
        page.check("#logy")
        until(page, "() => gradlmWatch.pointCount('live', 'loss') === 5 && gradlmWatch.state.x === 'time'")
        assert page.locator("#conn").get_attribute("data-state") == "live" and not errors
        stop(server)  # the watcher stops: the page says so and keeps what it has
        until(page, "() => document.getElementById('conn').dataset.state === 'gone'")
        assert "gradlm watch " + str(run) in page.locator("#notice").inner_text()
        assert page.evaluate("() => gradlmWatch.pointCount('live', 'loss')") == 5
        errors.clear()  # the browser logs its failed reconnections


def gradlm_series(page, chart: str) -> list[str]:
    return page.evaluate("(c) => gradlmWatch.series(c)", chart)


@needs_chromium
def test_a_comparison_overlays_its_runs_and_shows_new_ones(tmp_path, config, browser):
    cmp = tmp_path / "cmp"
    make_run(cmp / "optimizer-sgd", config, range(1, 41), loss0=7.0)
    make_run(cmp / "optimizer-adamw", config, range(1, 41), loss0=5.0)
    with live([str(cmp)], api_key="sekrit") as (url, _), open_page(browser, url, query="?key=sekrit") as (page, _):
        until(page, "() => gradlmWatch.runs().length === 2 && gradlmWatch.pointCount('optimizer-adamw', 'loss') === 40")
        assert page.evaluate("() => gradlmWatch.runs()") == ["optimizer-sgd", "optimizer-adamw"]
        assert gradlm_series(page, "loss") == [
            "optimizer-sgd train",
            "optimizer-sgd val",
            "optimizer-adamw train",
            "optimizer-adamw val",
        ]
        assert [n.inner_text() for n in page.locator("#runs .run .name").all()] == ["optimizer-sgd", "optimizer-adamw"]
        colors = page.eval_on_selector_all(
            "#runs .run .swatch", "els => els.map(e => getComputedStyle(e).backgroundColor)"
        )
        assert len(set(colors)) == 2
        make_run(cmp / "optimizer-muon", config, range(1, 11), lr_muon=True)
        until(page, "() => gradlmWatch.runs().length === 3 && gradlmWatch.pointCount('optimizer-muon', 'loss') === 10")
        assert "optimizer-muon lr_muon" in gradlm_series(page, "lr")
        page.locator("#runs .run input").first.uncheck()  # the legend hides a run from every chart
        until(
            page,
            "() => !gradlmWatch.series('loss').includes('optimizer-sgd train') && gradlmWatch.series('bpb').length "
            "=== 2",
        )
        page.select_option("#run-select", label="optimizer-muon")
        until(page, "() => document.getElementById('status').textContent.startsWith('running · step 10')")
        (cmp / "compare.json").write_text(
            json.dumps(
                {
                    "budget": "budget: max steps 40",
                    "runs": [
                        {"label": n, "status": "ok", "val_bpb": 2.5}
                        for n in ("optimizer=sgd", "optimizer=adamw", "optimizer=muon")
                    ],
                }
            )
        )
        until(page, "() => document.querySelectorAll('#compare tr').length === 4")
        with open_page(browser, url) as (keyless, errors):  # without the key: the page says what is missing
            until(keyless, "() => document.getElementById('conn').dataset.state === 'denied'")
            assert "/?key=KEY" in keyless.locator("#notice").inner_text()
            errors.clear()  # the browser logs the 401s


@needs_chromium
def test_a_finished_run_and_an_lr_find_on_a_phone(tmp_path, trained, browser):
    lr = tmp_path / "lrfind"
    lr.mkdir()
    lrs = [1e-5 * 1.2**i for i in range(60)]
    smoothed = [6.0 - 2.0 * min(i, 40) / 40 + (0.5 * (i - 45) if i > 45 else 0) for i in range(60)]
    append(
        lr / "lr_find.jsonl",
        *[
            {"step": i + 1, "lr": x, "loss": s + 0.05 * (-1) ** i, "smoothed": s}
            for i, (x, s) in enumerate(zip(lrs, smoothed))
        ][:50],
    )
    rows = metrics_rows(trained)
    steps = [r for r in rows if "loss" in r and "event" not in r]
    evals = [r for r in rows if "val_loss" in r]
    samples = (trained / "samples.jsonl").read_text().count("\n") if (trained / "samples.jsonl").exists() else 0
    with live([str(trained), str(lr)]) as (url, _), open_page(browser, url, 390, 844) as (page, _):
        until(page, "(n) => gradlmWatch.pointCount('tiny', 'loss') === n", len(steps))
        until(page, "() => document.getElementById('status').dataset.state === 'finished'")
        assert page.locator("#status").inner_text().startswith("finished: its budget ran out")
        assert page.locator("#progress").is_hidden()
        assert page.evaluate("() => gradlmWatch.pointCount('tiny', 'val_loss')") == len(evals) == 2
        assert page.evaluate("() => gradlmWatch.pointCount('tiny', 'val_bpb')") == len(evals)
        assert page.evaluate("() => gradlmWatch.pointCount('tiny', 'lr')") == len(steps)
        settings = page.locator("#settings").inner_text()
        assert "adamw" in settings and "40 steps" in settings and "1 layer × 32 wide" in settings
        final = page.locator("#final").inner_text()
        assert "40" in final and "val loss" in final
        assert page.locator("#samples .sample").count() == samples
        until(page, "() => gradlmWatch.pointCount('lrfind', 'smoothed', 'lrfind') === 50")
        assert "sweeping" in page.locator("#lrfind-result").inner_text()
        append(
            lr / "lr_find.jsonl",
            *[{"step": i + 1, "lr": lrs[i], "loss": smoothed[i], "smoothed": smoothed[i]} for i in range(50, 60)],
        )
        (lr / "lr_find.json").write_text(
            json.dumps(
                {
                    "suggested_lr": lrs[30],
                    "min_loss_lr": lrs[40],
                    "reason": "the steepest descent of the smoothed loss",
                    "lrs": lrs,
                    "losses": smoothed,
                    "smoothed": smoothed,
                    "optimizer": "adamw",
                }
            )
        )
        until(page, "() => document.getElementById('lrfind-result').textContent.includes('the steepest descent')")
        assert f"{lrs[30]:.2e}".replace("e-0", "e-") in page.locator("#lrfind-result").inner_text()
        assert page.evaluate("() => gradlmWatch.pointCount('lrfind', 'loss', 'lrfind')") == 60
        # no sideways scrolling on a phone
        assert page.evaluate("() => document.documentElement.scrollWidth <= innerWidth")
        widths = page.eval_on_selector_all(
            "figure.chart .uplot", "els => els.map(e => e.getBoundingClientRect().right)"
        )
        assert widths and max(widths) <= 390
