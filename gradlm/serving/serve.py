"""An OpenAI-compatible HTTP server for a run, and the playground page (FastAPI + uvicorn).

    gradlm serve runs/demo                     # http://127.0.0.1:8000/ (the playground), /v1 (the API)

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as server-sent
events with "stream": true), POST /tokenize (ids, pieces and byte offsets), GET /health, and the page
at /. Requests run through the continuous-batching engine (gradlm/generation/engine.py): a request that arrives
while others generate joins the running batch at the next step.

Every bad request gets OpenAI's error JSON {"error": {"message", "type", "param", "code"}} with its
status (400 bad field, 401 key, 404 model or path, 413 body, 503 busy), never a traceback. The
protocol itself (request fields, response shapes, logprobs) lives in gradlm/serving/openai_api.py. Nothing in
a request names a file; the server binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from gradlm.generation.engine import MAX_BATCH, MAX_QUEUE, Engine
from gradlm.serving import webserver
from gradlm.errors import ConfigError
from gradlm.generation.generate import LM

try:
    from fastapi import Depends, FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse
    from starlette.exceptions import HTTPException

    from gradlm.serving.openai_api import (
        APIError,
        ChatRequest,
        CompletionRequest,
        Server,
        TokenizeRequest,
        InspectRequest,
        error_response,
    )
except ImportError:  # the [serve] extra is missing: serve() says how to install it
    FastAPI = None

MAX_BODY = 1 << 20  # bytes; a larger request body gets 413


def load_lm(run: str, best: bool = False, runtime=None) -> LM:
    """The model to serve (the one place the server loads a run), run as runtime says (gradlm/runtime.py)."""
    from gradlm.generation.generate import load

    return load(run, best=best, runtime=runtime)


# ---- the HTTP app ------------------------------------------------------------------------------------------


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem pydantic found, as one sentence and the field it concerns."""
    e = exc.errors()[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    where = ".".join(loc)
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})", None
    if not loc:
        return "the request body must be a JSON object", None
    if e.get("type") == "missing":
        return f"{where} is required", param
    return f"{where}: {e.get('msg', 'invalid value')}", param


class BodyLimit:
    """ASGI middleware: read the request body up to `limit` bytes, answer 413 past it, then hand the
    body on (so a chunked upload cannot make the server hold more than `limit` bytes)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"the request body is larger than {self.limit:,} bytes", code="request_too_large")
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_big(scope, receive, send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect, when it comes

        await self.app(scope, replay, send)


def playground_html() -> str:
    """The playground: one static page shipped in the package (no external resources)."""
    return resources.files("gradlm.serving").joinpath("static/playground.html").read_text(encoding="utf-8")


def create_app(
    lm: LM,
    name: str,
    api_key: str = "",
    max_batch: int = MAX_BATCH,
    max_queue: int = MAX_QUEUE,
    engine: Engine | None = None,
    max_body: int = MAX_BODY,
    hosts: list[str] | None = None,
):
    """The ASGI app serving lm as model `name`. It starts its engine on startup (unless one is given
    already running) and stops it on shutdown. api_key: required as a Bearer token when set. hosts: the Host
    names a request may carry (others get 400; serve() gives this machine's names to a server on loopback
    without a key, as `gradlm watch` does)."""
    if FastAPI is None:
        raise ConfigError("gradlm serve needs FastAPI and uvicorn: pip install 'gradlm[serve]'")
    own_engine = engine is None
    engine = engine or Engine(lm.model, lm.tok, max_batch=max_batch, max_queue=max_queue, runtime=lm.runtime)
    server = Server(lm, name, engine, api_key)
    app = FastAPI(
        title="gradlm",
        lifespan=_lifespan(engine if own_engine else None),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    if hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    _add_error_handlers(app)
    _add_info_routes(app, server)
    _add_generation_routes(app, server)
    return BodyLimit(app, max_body) if max_body else app


def _lifespan(engine: Engine | None):
    """The app's lifespan: start the engine with the app and stop it with it (None: one run by the caller)."""
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine is not None:
            engine.start()
        yield
        if engine is not None:
            engine.stop()

    return lifespan


def _add_error_handlers(app) -> None:
    """Every failure answered as OpenAI's error JSON, never a traceback."""

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return error_response(e.status, e.message, e.param, e.code, e.kind, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        if "json" not in request.headers.get("content-type", ""):
            return error_response(400, "send the request body as JSON, with the header Content-Type: application/json")
        message, param = _validation_message(e)
        return error_response(400, message, param)

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        if e.status_code == 404:
            return error_response(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found")
        return error_response(e.status_code, str(e.detail), headers=e.headers)

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):  # a bug in gradlm: say so without a traceback in the answer
        return error_response(500, "internal server error; see the server's log", kind="server_error")


def _guarded(server: Server) -> list:
    """The dependency that checks a request's API key (when the server has one)."""

    async def authorized(request: HTTPRequest) -> None:  # async: no thread-pool hop per request
        server.check_key(request.headers.get("authorization"))

    return [Depends(authorized)]


def _add_info_routes(app, server: Server) -> None:
    """The playground page, /health, and the model list (the last behind the key)."""
    guarded = _guarded(server)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return playground_html()

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": server.name,
            "context_window": server.block,
            "auth": bool(server.api_key),
            **server.engine.stats(),
        }

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return server.models()

    @app.get("/v1/models/{model_id}", dependencies=guarded)
    async def model(model_id: str):
        server.check_model(model_id)
        return server.model_card()


def _add_generation_routes(app, server: Server) -> None:
    """Completions, chat completions and tokenize, behind the key."""
    guarded = _guarded(server)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: HTTPRequest):
        return await server.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(body: ChatRequest, request: HTTPRequest):
        return await server.chat(body, request)

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeRequest):
        return server.tokenize(body)

    @app.post("/inspect", dependencies=guarded)
    def inspect(body: InspectRequest):  # plain def: a forward pass, run in the thread pool beside the engine
        return server.inspect(body)


def serve(
    run: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str = "",
    best: bool = False,
    max_batch: int = MAX_BATCH,
    max_queue: int = MAX_QUEUE,
    threads: int = 0,
    runtime=None,
) -> None:
    """Serve a run directory until interrupted (the `gradlm serve` command).

    threads: torch threads for the model; 0 = all of torch's but one, which the HTTP side keeps (on a
    small CPU, torch's threads competing with the server's own work slow both down)."""
    if FastAPI is None:
        raise ConfigError("gradlm serve needs FastAPI and uvicorn: pip install 'gradlm[serve]'")
    import torch

    webserver.check_port(port)
    if max_batch < 1 or max_queue < 0 or threads < 0:
        raise ConfigError(
            f"--max-batch must be at least 1, --max-queue and --threads at least 0; got {max_batch}, {max_queue} and "
            f"{threads}"
        )
    torch.set_num_threads(threads or max(1, torch.get_num_threads() - 1))
    lm = load_lm(run, best, runtime)
    name = Path(run).resolve().name
    app = create_app(
        lm,
        name,
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        hosts=webserver.trusted_hosts(host, api_key),
    )
    sock, base = webserver.open_socket(host, port, api_key, exposes="use the model")
    print(
        f"serving {name} ({lm.model.num_params():,} parameters, context {lm.context_window} tokens; "
        f"{lm.runtime.describe()}; torch threads: {torch.get_num_threads()}) at {base}/ "
        f"(playground); OpenAI base URL {base}/v1{'; API key required' if api_key else ''}",
        flush=True,
    )
    webserver.run(app, sock)
