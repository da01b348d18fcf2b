"""A live page of training runs: curves, events, samples and progress while gradient descent happens (FastAPI +
uvicorn).

    gradlm watch runs/demo                   # http://127.0.0.1:8008/: one run, live
    gradlm watch runs/a runs/b               # several runs overlaid, one colour each on every chart
    gradlm watch runs/cmp                    # a `gradlm compare` directory: its runs as they appear
    gradlm watch runs/next --wait            # a run that training has yet to create

Endpoints: GET / (the page, gradlm/serving/static/watch.html), GET /static/NAME (its script and style sheet) and
GET /static/uplot/NAME (the vendored uPlot, the page's only library: the page asks nothing of any other
origin), GET /events (server-sent events: what the watched files hold, then what they gain). With an API
key the page and its static files stay open, and /events needs the key, as `Authorization: Bearer KEY` or
`?key=KEY` (a browser's EventSource cannot send headers; the page passes on the key of its own URL);
without it the answer is 401 {"error": {"message"}}.

What it reads, per run directory (written by training; gradlm/rundir.py owns the layout):
  config.json, summary.json       whole JSON files, sent again when their size or mtime changes
  metrics.jsonl, samples.jsonl    JSON lines, appended: only complete lines (ending in a newline) are sent,
                                  each once; a file replaced (new inode, as resume's rewrite does) or
                                  shrunk is sent again from its start after a "reset"
  lr_find.jsonl, lr_find.json     the same, in an `lr-find --out` directory
  compare.json                    in a `gradlm compare` directory, whose subdirectories are runs (found
                                  as they appear)

The protocol of /events, one JSON object per message (`event: NAME`, `data: {...}`):
  hello   {"version", "now", "poll_s", "sources"}: the first message of every connection; the page forgets all it had
          (a reconnect resends everything, so the page rebuilds rather than duplicates)
  runs    {"runs": [{"id", "name", "path", "kind", "group", "color"}], "groups": [{"id", "name", "path"}]}:
          the watched runs (kind "run", "lr_find" or "pending"), sent again whenever the list changes
  file    {"run"|"group": id, "file": "config"|"summary"|"lr_find"|"compare", "data": object or null}
  reset   {"run", "file": "metrics"|"samples"|"lr_find"}: forget that file's rows (rows of the new file follow)
  rows    {"run", "file", "rows": [...]}: new complete lines, in file order
  status  {"run", "state": "waiting"|"starting"|"running"|"finished", "reason", "message", "updated"}
and a comment line every HEARTBEAT_S seconds of silence.

Guarantees: the watcher only reads. Per poll (every POLL_S seconds, per viewer) it stats each file and
reads only the bytes appended since the last poll, so it never slows training, and it never writes into,
locks or keeps open a run's files. Every viewer has its own connection and its own position in each file.
It binds to 127.0.0.1 unless told otherwise. Importing it does not import torch.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
from importlib import resources
from pathlib import Path

from gradlm import layout
from gradlm.errors import ConfigError, GradlmError
from gradlm.serving import webserver
from gradlm.serving.webserver import sse

try:
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError:  # the [serve] extra is missing: serve() says how to install it
    FastAPI = None

POLL_S = 0.5  # how often each connection looks at the files (one stat per file)
HEARTBEAT_S = 15.0  # a comment line after this much silence keeps proxies from closing the stream
ROWS_PER_MESSAGE = 2000  # a long run's history goes out in several messages, not one huge one
RETRY_MS = 1500  # the browser's reconnect delay after the stream breaks

RUN_FILES = layout.RUN_MARKERS  # either one makes a folder a run directory
LR_FIND_FILES = (layout.LR_FIND_ROWS, layout.LR_FIND_RESULT)
INSTALL = "gradlm watch needs FastAPI and uvicorn: pip install 'gradlm[serve]'"

# the page's own files: name under /static/ -> (file under gradlm/serving/static/, media type). Nothing else is served.
ASSETS = {
    "watch.js": ("watch.js", "text/javascript; charset=utf-8"),
    "watch.css": ("watch.css", "text/css; charset=utf-8"),
    "uplot/uPlot.iife.min.js": ("vendor/uplot/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "uplot/uPlot.min.css": ("vendor/uplot/uPlot.min.css", "text/css; charset=utf-8"),
}
# the page works offline and shows untrusted model text: it may load and connect to its own origin only
PAGE_POLICY = (
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)


# ---- reading files that another process writes -------------------------------------------------------------


def _finite(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def parse_json(text: str | bytes):
    """JSON with NaN, Infinity and overflowing numbers read as null (what the browser's JSON.parse accepts)."""
    return json.loads(text, parse_float=_finite, parse_constant=lambda _: None)


class JsonLines:
    """The complete lines of a JSON-lines file that another process appends to, and may replace.

    poll() stats the file and, when it grew, reads just the new bytes up to the last newline (a line still
    being written waits for the next poll). A new inode (an atomic rewrite), a smaller size or a position
    that no longer follows a newline (rewritten in place) means the file was replaced: it is read again
    from the start. The file is opened only to read, and closed at once."""

    def __init__(self, path: Path):
        self.path = path
        self.inode: int | None = None  # None: not seen (yet, or any more)
        self.offset = 0  # bytes consumed: the end of the last complete line read

    def poll(self) -> tuple[bool, list[dict]] | None:
        """None when nothing changed, else (replaced, rows): the rows of the lines completed since the last
        poll, and whether the rows read before no longer hold (then rows are the new file's, from its start)."""
        try:
            st = os.stat(self.path)
        except OSError:  # missing (not yet, or removed)
            if self.inode is None:
                return None
            self.inode, self.offset = None, 0
            return True, []
        if st.st_ino == self.inode and st.st_size == self.offset:
            return None
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())  # the file just opened: a rename since the stat above is seen here
                replaced = self.inode is not None and (st.st_ino != self.inode or st.st_size < self.offset)
                start = 0 if replaced else self.offset
                if start:
                    f.seek(start - 1)  # from the newline that ended the last line read: it must still be there
                    data = f.read(st.st_size - start + 1)
                    if data[:1] != b"\n":
                        replaced, start = True, 0
                        f.seek(0)
                        data = f.read(st.st_size)
                    else:
                        data = data[1:]
                else:
                    data = f.read(st.st_size)
        except OSError:  # removed between the stat and the open: the next poll says so
            return None
        end = data.rfind(b"\n") + 1
        self.inode, self.offset = st.st_ino, start + end
        rows = [r for r in map(_line, data[:end].splitlines()) if r is not None]
        return (replaced, rows) if rows or replaced else None


def _line(line: bytes) -> dict | None:
    """One line's object, or None for a blank or unreadable line (a crash can cut a line short)."""
    try:
        row = parse_json(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) else None


class JsonFile:
    """A whole JSON file that another process rewrites (atomically): poll() gives its object when it
    changed (size, mtime or inode), None as the object once it is gone."""

    def __init__(self, path: Path):
        self.path = path
        self.seen: tuple | None = None

    def poll(self) -> tuple[bool, dict | None]:
        """(changed, object)."""
        try:
            st = os.stat(self.path)
        except OSError:
            changed, self.seen = self.seen is not None, None
            return changed, None
        seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        if seen == self.seen:
            return False, None
        try:
            data = parse_json(self.path.read_bytes())
        except (OSError, ValueError, UnicodeDecodeError):  # half written by a writer that is not atomic: next poll
            return False, None
        self.seen = seen
        return True, data if isinstance(data, dict) else None


# ---- what the files say about a run --------------------------------------------------------------------------


class Story:
    """What a run's metrics rows say so far about whether it is training: its last step, and the last
    "stopped" event unless training resumed after it."""

    def __init__(self):
        self.last_step: int | None = None  # of the last step or evaluation row
        self.stop: dict | None = None  # the "stopped" event that ended the latest training, if any
        self.resumed = False  # a "resumed" event came after the last stop: the summary is the previous training's
        self.rows = 0

    def add(self, row: dict) -> None:
        self.rows += 1
        kind, step = row.get("event"), row.get("step")
        if kind == "stopped":
            self.stop, self.resumed = row, False
        elif kind in ("resumed", "budget_extended"):
            self.stop, self.resumed = None, True
        elif kind is None and isinstance(step, (int, float)):
            if self.stop is not None and step > (self.stop.get("step") or 0):
                self.stop = None  # training went on after the stop (rows of a resume that wrote no event)
            self.last_step = step


def run_status(has_config: bool, story: Story, summary: dict | None) -> dict:
    """{"state", "reason", "message"} of a run directory, from its files alone.

    summary.json is written when a training invocation ends, and a resumed run keeps the previous one until
    it ends again, so the summary says "finished" only when nothing came after it: no "resumed" event, no
    step beyond the summary's. A "stopped" event (the last thing training writes) says it outright."""
    if story.stop is not None:
        reason = story.stop.get("reason") or (summary or {}).get("stop")
        return {"state": "finished", "reason": reason, "message": story.stop.get("message")}
    if summary is not None and not story.resumed:
        steps = summary.get("steps")
        if story.last_step is None or not isinstance(steps, (int, float)) or story.last_step <= steps:
            return {"state": "finished", "reason": summary.get("stop"), "message": None}
    if story.last_step is not None:
        return {"state": "running", "reason": None, "message": None}
    if has_config or story.rows:
        return {"state": "starting", "reason": None, "message": None}  # preparing data, building the model
    return {"state": "waiting", "reason": None, "message": None}


def kind_of(path: Path) -> str | None:
    """ "run", "lr_find" or "compare" for a directory gradlm wrote (or is writing), else None."""
    if not path.is_dir():
        return None
    if any((path / f).is_file() for f in RUN_FILES):
        return "run"
    if any((path / f).is_file() for f in LR_FIND_FILES):
        return "lr_find"
    if (path / layout.COMPARE).is_file() or subruns(path):
        return "compare"
    return None


def subruns(path: Path, known: frozenset | set = frozenset()) -> list[Path]:
    """The run directories inside a comparison (not yet in known), in the order they started."""
    found = []
    try:
        entries = [Path(e.path) for e in os.scandir(path) if e.is_dir() and Path(e.path) not in known]
    except OSError:
        return []
    for sub in entries:
        files = [sub / f for f in RUN_FILES if (sub / f).is_file()]
        if files:
            found.append((min(f.stat().st_mtime_ns for f in files), sub.name, sub))
    return [sub for *_, sub in sorted(found)]


def check_sources(paths: list[str], wait: bool = False) -> list[tuple[Path, str]]:
    """(path, kind) of each path to watch, kind "pending" for one that --wait accepts before training starts
    there; a ConfigError for a path that is not something to watch."""
    if not paths:
        raise ConfigError("give at least one run directory to watch")
    what = "a run directory (the --out of gradlm train), a `gradlm compare` directory or an `lr-find --out` directory"
    out: dict[Path, str] = {}
    for p in paths:
        path = Path(p).expanduser().resolve()
        if not path.exists():
            if not wait:
                raise ConfigError(
                    f"no such run directory: {p}; give {what}, or add --wait to watch one that training is about to "
                    "create"
                )
            out.setdefault(path, "pending")
            continue
        if not path.is_dir():
            raise ConfigError(f"{p} is a file; give {what}")
        kind = kind_of(path)
        if kind is None and not wait:
            raise ConfigError(
                f"{p} is not {what}: it holds none of config.json, metrics.jsonl, lr_find.jsonl or compare.json; add "
                "--wait if training has yet to start there"
            )
        out.setdefault(path, kind or "pending")
    return list(out.items())


def run_names(paths: list[Path]) -> list[str]:
    """Each run's name: its folder's name, or parent/name (then the whole path) where two would look alike."""
    names = [p.name or str(p) for p in paths]
    for widen in (lambda p: f"{p.parent.name}/{p.name}", str):
        twice = {n for n in names if names.count(n) > 1}
        names = [widen(p) if n in twice else n for p, n in zip(paths, names)]
    return names


class Run:
    """One watched run directory (or lr-find directory) and where each of its files has been read to."""

    def __init__(self, id: str, path: Path, kind: str, group: str | None = None):
        self.id, self.path, self.kind, self.group = id, path, kind, group
        self.story = Story()
        self.data: dict[str, dict | None] = {}  # the whole files' objects, by name
        self.status: dict | None = None
        self.set_kind(kind)

    def set_kind(self, kind: str) -> None:
        self.kind, self.data = kind, {}
        if kind == "run":
            self.lines = {
                "metrics": JsonLines(self.path / layout.METRICS),
                "samples": JsonLines(self.path / layout.SAMPLES),
            }
            self.files = {
                "config": JsonFile(self.path / layout.CONFIG),
                "summary": JsonFile(self.path / layout.SUMMARY),
            }
        elif kind == "lr_find":
            self.lines = {"lr_find": JsonLines(self.path / "lr_find.jsonl")}
            self.files = {"lr_find": JsonFile(self.path / "lr_find.json")}
        else:
            self.lines, self.files = {}, {}

    def poll(self, send) -> None:
        for name, f in self.files.items():
            changed, data = f.poll()
            if changed:
                self.data[name] = data
                send("file", {"run": self.id, "file": name, "data": data})
        for name, f in self.lines.items():
            got = f.poll()
            if got is None:
                continue
            replaced, rows = got
            if replaced:
                send("reset", {"run": self.id, "file": name})
                if name == "metrics":
                    self.story = Story()
            if name == "metrics":
                for r in rows:
                    self.story.add(r)
            for i in range(0, len(rows), ROWS_PER_MESSAGE):
                send("rows", {"run": self.id, "file": name, "rows": rows[i : i + ROWS_PER_MESSAGE]})
        status = self.current_status()
        if status != self.status:
            self.status = status
            send("status", {"run": self.id, **status})

    def current_status(self) -> dict:
        if self.kind == "lr_find":
            state = (
                "finished"
                if self.data.get("lr_find")
                else "running"
                if self.lines["lr_find"].inode is not None
                else "waiting"
            )
            status = {"state": state, "reason": None, "message": None}
        else:
            status = run_status(self.data.get("config") is not None, self.story, self.data.get("summary"))
        status["updated"] = self._updated()
        return status

    def _updated(self) -> float | None:
        """When the run's rows last grew (seconds since the epoch), for the page's "no news for ..." hint."""
        for f in self.lines.values():
            try:
                return round(os.stat(f.path).st_mtime, 1)
            except OSError:
                pass
        return None


class Watcher:
    """One viewer's view of the watched paths: poll() gives the messages that bring the viewer up to date
    (everything on the first call, then what changed). Runs inside a comparison are found as they appear;
    a --wait path becomes a run, an lr-find or a comparison once training writes there."""

    def __init__(self, sources: list[tuple[Path, str]]):
        self.sources = [[path, kind] for path, kind in sources]
        self.runs: list[Run] = []
        self.made = 0  # runs ever added: ids never repeat, even after a --wait path turned out a comparison
        self.groups: dict[Path, tuple[str, JsonFile]] = {}
        self.started = False
        self.listed: dict | None = None

    def poll(self) -> list[tuple[str, dict]]:
        out: list[tuple[str, dict]] = []

        def send(event: str, data: dict) -> None:
            out.append((event, data))

        if not self.started:
            self.started = True
            send(
                "hello",
                {
                    "version": 1,
                    "now": round(time.time(), 1),
                    "poll_s": POLL_S,
                    "sources": [str(path) for path, _ in self.sources],
                },
            )
        self._discover()
        listed = self._listing()
        if listed != self.listed:
            self.listed = listed
            send("runs", listed)
        for path, (gid, f) in self.groups.items():
            changed, data = f.poll()
            if changed:
                send("file", {"group": gid, "file": "compare", "data": data})
        for run in self.runs:
            run.poll(send)
        return out

    def _add(self, path: Path, kind: str, group: str | None = None) -> Run:
        run = Run(f"r{self.made}", path, kind, group)
        self.made += 1
        self.runs.append(run)
        return run

    def _discover(self) -> None:
        for source in self.sources:
            path, kind = source
            if kind == "pending":
                kind = kind_of(path)
                if kind is None:
                    if not any(r.path == path for r in self.runs):
                        self._add(path, "pending")  # shown as waiting for the run to start
                    continue
                source[1] = kind
                waiting = next((r for r in self.runs if r.path == path and r.kind == "pending"), None)
                if kind == "compare":
                    if waiting:
                        self.runs.remove(waiting)
                elif waiting:
                    waiting.set_kind(kind)
                    continue
            if kind == "compare":
                if path not in self.groups:
                    self.groups[path] = (f"g{len(self.groups)}", JsonFile(path / layout.COMPARE))
                gid = self.groups[path][0]
                for sub in subruns(path, {r.path for r in self.runs}):
                    self._add(sub, "run", gid)
            elif not any(r.path == path for r in self.runs):
                self._add(path, kind)

    def _listing(self) -> dict:
        names = run_names([r.path for r in self.runs])
        group_names = run_names(list(self.groups))
        return {
            # colour by place in the list: the first run C0, as in compare.png (a --wait placeholder leaves no gap)
            "runs": [
                {"id": r.id, "name": n, "path": str(r.path), "kind": r.kind, "group": r.group, "color": i}
                for i, (r, n) in enumerate(zip(self.runs, names))
            ],
            "groups": [
                {"id": gid, "name": n, "path": str(p)} for (p, (gid, _)), n in zip(self.groups.items(), group_names)
            ],
        }


# ---- the HTTP app ------------------------------------------------------------------------------------------


def _static(name: str) -> bytes:
    try:
        return resources.files("gradlm.serving").joinpath("static", *name.split("/")).read_bytes()
    except OSError:
        raise GradlmError(
            f"gradlm/serving/static/{name} is missing from this installation of gradlm; reinstall it"
        ) from None


def create_app(
    paths: list[str], api_key: str = "", wait: bool = False, poll_s: float = POLL_S, hosts: list[str] | None = None
):
    """The ASGI app watching paths (run, compare or lr-find directories; with wait, ones not there yet).

    api_key: when set, /events needs it (Bearer header or ?key=); the page and its static files stay open.
    hosts: the Host names a request may carry (others get 400): serve() gives this machine's names to a watcher
    on 127.0.0.1 without a key, so a web page elsewhere cannot read the runs by pointing its own name at us.
    app.state.closing: a threading.Event; set it before stopping the server and every stream ends within a
    poll, so the server need not cut them off."""
    if FastAPI is None:
        raise ConfigError(INSTALL)
    sources = check_sources(paths, wait)
    page = _static("watch.html")
    assets = {name: (_static(f), media) for name, (f, media) in ASSETS.items()}
    app = FastAPI(title="gradlm watch", docs_url=None, redoc_url=None, openapi_url=None)
    if hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    closing = app.state.closing = threading.Event()
    _add_page_routes(app, page, assets)
    _add_events_route(app, sources, api_key, closing, poll_s)
    return app


def _error(status: int, message: str):
    return JSONResponse({"error": {"message": message}}, status_code=status)


def _add_page_routes(app, page: bytes, assets: dict[str, tuple[bytes, str]]) -> None:
    """The page, its static files (a fixed list, read once), and a JSON 404 for anything else."""

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        if e.status_code == 404:
            return _error(404, f"no such page: {request.url.path}")
        return _error(e.status_code, str(e.detail))

    @app.get("/", include_in_schema=False)
    async def index():
        return Response(
            page,
            media_type="text/html; charset=utf-8",
            headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"},
        )

    @app.get("/static/{name:path}", include_in_schema=False)
    async def static(name: str):
        if name not in assets:  # a fixed list: no path from a request ever reaches the file system
            return _error(404, f"no such file: /static/{name}")
        body, media = assets[name]
        return Response(body, media_type=media, headers={"Cache-Control": "no-cache"})


def _add_events_route(app, sources: list, api_key: str, closing: threading.Event, poll_s: float) -> None:
    """/events: the runs' changes as server-sent events, behind the key when there is one."""

    @app.get("/events")
    async def events(request: HTTPRequest):
        problem = webserver.key_problem(
            request.query_params.get("key") or webserver.bearer(request.headers.get("authorization")), api_key
        )
        if problem == "missing":
            return _error(
                401, "this watcher needs its API key: open the page as /?key=KEY (or send Authorization: Bearer KEY)"
            )
        if problem == "wrong":
            return _error(401, "the API key is wrong")
        stream = _event_stream(request, sources, closing, poll_s)
        return StreamingResponse(
            stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )


async def _event_stream(request: HTTPRequest, sources: list, closing: threading.Event, poll_s: float):
    """One viewer's stream: its own Watcher polled every poll_s until the viewer leaves or the server closes,
    with a comment line after HEARTBEAT_S of quiet (so proxies keep the connection open)."""
    watcher = Watcher(sources)
    yield f"retry: {RETRY_MS}\n\n"
    quiet_since = time.monotonic()
    while not closing.is_set() and not await request.is_disconnected():
        messages = await asyncio.to_thread(watcher.poll)  # file reads off the event loop: other viewers stay live
        if messages:
            yield "".join(sse(data, event) for event, data in messages)
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= HEARTBEAT_S:
            yield ": still watching\n\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(poll_s)


def serve(
    paths: list[str],
    host: str = "127.0.0.1",
    port: int = 8008,
    api_key: str = "",
    wait: bool = False,
    exit_with_parent: bool = False,
) -> None:
    """Serve the live page of paths until interrupted (the `gradlm watch` command). Prints one line,
    `watching NAMES at http://HOST:PORT/`, once it listens (the real port when port is 0).
    exit_with_parent: stop when the process that started this one ends, however it ends (`--watch`: a training
    killed with SIGKILL leaves no watcher holding the port)."""
    if FastAPI is None:
        raise ConfigError(INSTALL)
    webserver.check_port(port)  # before the page is built
    app = create_app(paths, api_key=api_key, wait=wait, hosts=webserver.trusted_hosts(host, api_key))
    sock, base = webserver.open_socket(host, port, api_key, exposes="read these runs")
    names = ", ".join(run_names([path for path, _ in check_sources(paths, wait)]))
    key_note = " (API key required: add ?key=KEY to the address)" if api_key else ""
    print(f"watching {names}{key_note} at {base}/", flush=True)
    # Ctrl-C or the parent's end: end the open streams first, so the viewers' connections close cleanly
    webserver.run(app, sock, on_exit=app.state.closing.set, exit_with_parent=exit_with_parent)
