"""The OpenAI-compatible API over the continuous-batching engine: what requests may say, how they
become token ids and a SamplingConfig, and how pieces of generated text become OpenAI's responses
(completions and chat, whole or as server-sent-event chunks) with usage and logprobs.

serve.py wraps this in an HTTP app. Conventions kept from OpenAI: errors as {"error": {"message",
"type", "param", "code"}}; finish_reason "stop" (an end token or a stop string) or "length" (and gradlm's
"error", with an "error" object in the choice, where a constraint that compiled failed while decoding: its text
stops short of fitting; a constraint that cannot compile is a 400 before decoding); a token
that cuts a character shows as "bytes:\\xe2\\x80" in logprobs. gradlm adds "id" (chat) and
"token_ids" (completions) to logprobs, the token ids the playground shows. Probabilities are the
model's own (log softmax of its logits), before penalties, temperature and top-k/top-p/min-p.

Text in a request is always plain text: a prompt or message spelling <|endoftext|> or <|user|> is
encoded as those characters; only the chat template (gradlm/text/chat.py) inserts special tokens.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gradlm.text.chat import encode_chat
from gradlm.text.chat import stop_ids as chat_stop_ids
from gradlm.generation.constrain import Constraint, make_constraint
from gradlm.generation.engine import Engine, Piece, Request
from gradlm.errors import BusyError, ConfigError, GradlmError
from gradlm.evaluation.inspection import inspect_text
from gradlm.generation.generate import LM, SamplingConfig
from gradlm.serving.webserver import bearer, key_problem, sse

MAX_N = 16  # most samples per prompt
MAX_LOGPROBS = 20  # most alternatives per token
MAX_STOPS = 16


# ---- errors: OpenAI's JSON ------------------------------------------------------------------------------


class APIError(Exception):
    """A request the server refuses, as OpenAI reports it."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    kind: str = "invalid_request_error",
    headers=None,
):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---- requests ---------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """Fields both endpoints share. Unknown fields (such as "user") are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False)
    stop: Any = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # Constrained decoding (gradlm/generation/constrain.py): OpenAI's response_format, and gradlm's choices and regex.
    response_format: Any = None
    choices: Any = None
    regex: Any = None


class CompletionRequest(Sampling):
    prompt: Any = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatRequest(Sampling):
    messages: Any = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(BaseModel):
    model: str | None = None
    text: str


class InspectRequest(BaseModel):
    model: str | None = None
    text: str
    top: int = 5  # next-token candidates at each position
    lens: bool = False  # each layer's guess too (the logit lens)


def _stops(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop holds {len(stops)} strings; at most {MAX_STOPS} are allowed", "stop")
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", "stop")
    return tuple(stops)


def _message_text(content: Any, n: int) -> Any:
    """A message's content as a string: a string, or OpenAI's list of {"type": "text", "text"} parts."""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise APIError(
                400,
                f'message {n}: content parts must be {{"type": "text", "text": ...}} (this model reads text only)',
                "messages",
            )
        return "".join(p["text"] for p in content)
    return content


def token_string(raw: bytes) -> str:
    """A token's text for logprobs: its UTF-8 text, or "bytes:\\xe2\\x80" when it cuts a character
    (OpenAI's convention)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _failed(choice: dict, piece: Piece | None) -> dict:
    """A choice whose constraint failed while decoding says so: finish_reason "error" and an "error" field
    with why (its text stops short of fitting the constraint); any other choice as it is."""
    if piece is not None and piece.error:
        choice["error"] = {"message": piece.error, "type": "invalid_request_error", "code": "constraint_failed"}
    return choice


class _Usage:
    """Token counts of one request: the prompt(s), and every token each choice generated."""

    def __init__(self, prompt_tokens: int):
        self.prompt, self.generated = prompt_tokens, {}

    def add(self, choice: int, piece: Piece) -> None:
        self.generated[choice] = piece.generated

    def json(self) -> dict:
        done = sum(self.generated.values())
        return {"prompt_tokens": self.prompt, "completion_tokens": done, "total_tokens": self.prompt + done}


class Mailbox:
    """Hands pieces from the engine's thread to the event loop, waking the loop once per burst (one
    step of the batch gives a piece to every running row) rather than once per piece."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock = loop, threading.Lock()
        self.items: list = []  # (queue, item) pairs not yet handed over

    def post(self, queue: asyncio.Queue, item) -> None:
        """On the engine's thread: put item on queue, in the event loop."""
        with self.lock:
            self.items.append((queue, item))
            if len(self.items) > 1:  # a wake-up is already on its way
                return
        try:
            self.loop.call_soon_threadsafe(self._hand_over)
        except RuntimeError:  # the event loop has closed (the server is shutting down)
            pass

    def _hand_over(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


class Server:
    """The HTTP layer over one LM and its Engine: validates requests and shapes OpenAI responses."""

    def __init__(self, lm: LM, name: str, engine: Engine, api_key: str = ""):
        self.lm, self.tok, self.name, self.engine, self.api_key = lm, lm.tok, name, engine, api_key
        self.block = lm.model.cfg.block_size
        self.created = int(time.time())
        self.mailbox: Mailbox | None = None  # made on the first request, in the server's event loop

    # ---- validation ---------------------------------------------------------------------------------

    def check_key(self, authorization: str | None) -> None:
        problem = key_problem(bearer(authorization), self.api_key)
        if problem == "missing":
            raise APIError(
                401, "this server needs an API key: send the header Authorization: Bearer KEY", code="invalid_api_key"
            )
        if problem == "wrong":
            raise APIError(401, "the API key is wrong", code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(
                404,
                f"no model {model!r} here; this server serves {self.name!r} (see GET /v1/models)",
                "model",
                "model_not_found",
            )

    def sampling(self, body: Sampling, prompt_tokens: int, prompt_param: str) -> SamplingConfig:
        """The SamplingConfig of a request, after the checks that need the prompt's length."""
        self.check_model(body.model)
        unsupported = {"logit_bias": bool(body.logit_bias)}
        if isinstance(body, CompletionRequest):
            unsupported.update(echo=body.echo, best_of=body.best_of not in (None, 1), suffix=bool(body.suffix))
        for field_name, used in unsupported.items():
            if used:
                raise APIError(400, f"{field_name} is not supported by this server; leave it out", field_name)
        room = self.block - prompt_tokens
        if room < 1:
            raise APIError(
                400,
                f"the prompt is {prompt_tokens} tokens long; the context window is {self.block} tokens and leaves no "
                "room to generate; shorten it",
                prompt_param,
                "context_length_exceeded",
            )
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and prompt_tokens + asked > self.block:
            which = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise APIError(
                400,
                f"this request needs {prompt_tokens + asked} tokens ({prompt_tokens} in the prompt + {asked} {which}), "
                f"more than the context window of {self.block} tokens; ask for at most {room} new tokens or shorten "
                "the prompt",
                which,
                "context_length_exceeded",
            )
        cfg = SamplingConfig(
            max_new_tokens=asked or room,  # by default: the rest of the context window
            temperature=body.temperature,
            top_k=max(body.top_k, 0),
            top_p=body.top_p,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
            seed=body.seed,
            stop=_stops(body.stop),
        )
        try:
            cfg.validate()
        except ConfigError as e:
            raise APIError(400, str(e)) from None
        return cfg

    def constraint(self, body: Sampling) -> Constraint | None:
        """What the output must be: response_format {"type": "json_object"} or {"type": "json_schema",
        "json_schema": {"name": ..., "schema": {...}}} as OpenAI defines them, or gradlm's "choices" (a list
        of strings) or "regex"; at most one. Whether it compiles is checked when it is submitted."""
        given: dict[str, Any] = {}
        rf = body.response_format
        kind = rf.get("type") if isinstance(rf, dict) else rf
        if rf is not None and kind not in ("text", "json_object", "json_schema"):
            raise APIError(
                400,
                'response_format must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                '"json_schema": {...}}',
                "response_format",
            )
        if kind == "json_object":
            given["json_object"] = True
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise APIError(
                    400,
                    'response_format json_schema needs "json_schema": {"name": ..., "schema": {...}}',
                    "response_format",
                )
            given["json_schema"] = spec["schema"]
        if body.choices is not None:
            given["choices"] = body.choices
        if body.regex is not None:
            given["regex"] = body.regex
        try:
            return make_constraint(**given)
        except ConfigError as e:
            raise APIError(400, str(e), "response_format" if rf is not None else next(iter(given), None)) from None

    def completion_prompts(self, prompt: Any) -> list[list[int]]:
        """Token ids of each prompt: always plain text (special-token text stays text); "" starts a document."""
        if prompt is None:
            raise APIError(400, "prompt is required", "prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise APIError(
                400, "prompt must be a string or a non-empty list of strings (token ids are not accepted)", "prompt"
            )
        out = []
        for p in prompts:
            ids = self.tok.encode(p) if p else [self.tok.eot_id]
            if not ids or ids[0] < 0:
                raise APIError(
                    400, "the prompt is empty and this tokenizer has no <|endoftext|> to start from", "prompt"
                )
            out.append(ids)
        return out

    def chat_prompt(self, messages: Any) -> list[int]:
        """Token ids of the conversation through the chat template, ending where the assistant answers."""
        if messages is None:
            raise APIError(400, "messages is required", "messages")
        if isinstance(messages, list):  # content parts become text; other fields (such as "name") are dropped
            messages = [
                {"role": m.get("role"), "content": _message_text(m.get("content"), n)} if isinstance(m, dict) else m
                for n, m in enumerate(messages, 1)
            ]
        try:
            return encode_chat(self.tok, messages)
        except GradlmError as e:
            raise APIError(400, str(e), "messages") from None

    # ---- running -----------------------------------------------------------------------------------

    def submit(
        self,
        prompts: list[list[int]],
        cfg: SamplingConfig,
        n: int,
        stop_ids: set[int],
        logprobs: int | None,
        stream: bool,
        constraint: Constraint | None = None,
    ):
        """Queue every prompt (n samples each). Returns the handles and the queue on which lists of
        pieces arrive, tagged with the prompt's first choice index: each piece as it comes when
        streaming, else each sample's pieces all at once when it is done (one wake-up per sample)."""
        if self.mailbox is None:
            self.mailbox = Mailbox(asyncio.get_running_loop())
        queue, handles = asyncio.Queue(), []

        def deliver(base: int):  # the callbacks run on the engine's thread
            if stream:
                return lambda piece: self.mailbox.post(queue, (base, [piece]))
            held: dict[int, list[Piece]] = {}

            def on_piece(piece):
                if isinstance(piece, Exception):
                    return self.mailbox.post(queue, (base, [piece]))
                held.setdefault(piece.index, []).append(piece)
                if piece.finish is not None:
                    self.mailbox.post(queue, (base, held.pop(piece.index)))

            return on_piece

        try:
            for i, ids in enumerate(prompts):
                req = Request(ids, cfg, n, frozenset(stop_ids), logprobs, constraint=constraint)
                handles.append(self.engine.submit(req, deliver(i * n)))
        except BusyError as e:
            for h in handles:
                h.cancel()
            raise APIError(503, str(e), code="overloaded", kind="server_error") from None
        except ConfigError as e:
            for h in handles:
                h.cancel()
            raise APIError(400, str(e)) from None
        return handles, queue

    async def pieces(self, handles, queue: asyncio.Queue, choices: int, request: HTTPRequest | None):
        """(choice index, Piece) until every choice finished, or until the client goes away: for a
        non-streamed answer (`request` given) a watcher notices the disconnect; a stream is cancelled
        by Starlette itself. Either way, leaving early cancels the request's rows at once."""
        watcher = asyncio.ensure_future(_watch_disconnect(request, queue)) if request is not None else None
        left = choices
        try:
            while left:
                # pieces come a step's worth at a time
                item = queue.get_nowait() if not queue.empty() else await queue.get()
                if item is None:  # the client went away
                    return
                base, batch = item
                for piece in batch:
                    if isinstance(piece, Exception):
                        raise APIError(
                            500, "the model failed while generating; see the server's log", kind="server_error"
                        )
                    if piece.finish is not None:
                        left -= 1
                    yield base + piece.index, piece
        finally:
            if watcher is not None:
                watcher.cancel()
            for h in handles:
                h.cancel()

    def logprob_entry(self, token_id: int, logprob: float, top) -> dict:
        """One token in chat's logprobs format, plus gradlm's "id" (the token id)."""
        raw = self.tok.pieces[token_id]
        alts = [
            {"token": token_string(self.tok.pieces[i]), "logprob": lp, "bytes": list(self.tok.pieces[i]), "id": i}
            for i, lp in top
        ]
        return {
            "token": token_string(raw),
            "logprob": logprob,
            "bytes": list(raw),
            "id": token_id,
            "top_logprobs": alts,
        }

    def completion_logprobs(self, piece: Piece) -> dict:
        """Completions' logprobs format for the tokens of a piece (text_offset: where each token's text
        starts in the choice's text), plus gradlm's "token_ids"."""
        tokens = [token_string(self.tok.pieces[t.id]) for t in piece.tokens]
        top = [{token_string(self.tok.pieces[i]): lp for i, lp in t.top} for t in piece.tokens]
        return {
            "tokens": tokens,
            "token_logprobs": [t.logprob for t in piece.tokens],
            "top_logprobs": top,
            "text_offset": piece.offsets,
            "token_ids": [t.id for t in piece.tokens],
        }

    # ---- endpoints ---------------------------------------------------------------------------------

    def stream(self, handles, queue, choices: int, base: dict, usage: _Usage, include_usage: bool, chunk, first=()):
        """A server-sent-event response: the `first` choice chunks, then chunk(i, piece) for each piece
        (None skips it), a usage chunk when asked, and data: [DONE]."""
        extra = {"usage": None} if include_usage else {}

        async def events():
            for c in first:
                yield sse(dict(base, choices=[c], **extra))
            try:
                async for i, piece in self.pieces(handles, queue, choices, None):
                    usage.add(i, piece)
                    c = chunk(i, piece)
                    if c is not None:
                        yield sse(dict(base, choices=[c], **extra))
            except APIError as e:  # the status is sent already: report it in the stream, as OpenAI does
                yield sse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}})
                return
            if include_usage:
                yield sse(dict(base, choices=[], usage=usage.json()))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def completions(self, body: CompletionRequest, request: HTTPRequest):
        prompts = self.completion_prompts(body.prompt)
        cfg = self.sampling(body, max(len(p) for p in prompts), "prompt")
        # Where `gradlm generate` stops: <|endoftext|>, and <|end|> too for a chat-tuned model.
        handles, queue = self.submit(
            prompts, cfg, body.n, self.lm.stop_ids, body.logprobs, body.stream, self.constraint(body)
        )
        choices = len(prompts) * body.n  # choice p * n + j is sample j of prompt p
        usage = _Usage(sum(len(p) for p in prompts))
        base = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.name,
        }
        want_lp = body.logprobs is not None

        def part(i: int, piece: Piece) -> dict | None:
            if not piece.text and piece.finish is None and not (want_lp and piece.tokens):
                return None
            lp = self.completion_logprobs(piece) if want_lp else None
            return _failed({"index": i, "text": piece.text, "logprobs": lp, "finish_reason": piece.finish}, piece)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self.stream(handles, queue, choices, base, usage, include_usage, part)
        out = [{"index": i, "text": "", "logprobs": None, "finish_reason": None} for i in range(choices)]
        async for i, piece in self.pieces(handles, queue, choices, request):
            usage.add(i, piece)
            c = part(i, piece)
            if c is not None:
                if want_lp:
                    out[i]["logprobs"] = (
                        c["logprobs"]
                        if out[i]["logprobs"] is None
                        else {k: v + c["logprobs"][k] for k, v in out[i]["logprobs"].items()}
                    )
                out[i]["text"] += c["text"]
                out[i]["finish_reason"] = c["finish_reason"]
                if "error" in c:
                    out[i]["error"] = c["error"]
        return dict(base, choices=out, usage=usage.json())

    async def chat(self, body: ChatRequest, request: HTTPRequest):
        prompt = self.chat_prompt(body.messages)
        cfg = self.sampling(body, len(prompt), "messages")
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        top = (body.top_logprobs or 0) if body.logprobs else None
        handles, queue = self.submit(
            [prompt], cfg, body.n, chat_stop_ids(self.tok), top, body.stream, self.constraint(body)
        )
        choices, usage = body.n, _Usage(len(prompt))
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
        }

        def entries(piece: Piece) -> list[dict]:
            return [self.logprob_entry(t.id, t.logprob, t.top) for t in piece.tokens]

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def part(i: int, piece: Piece) -> dict | None:
                if not piece.text and piece.finish is None and not (top is not None and piece.tokens):
                    return None
                delta = {"content": piece.text} if piece.text or piece.finish is None else {}
                lp = {"content": entries(piece)} if top is not None else None
                return _failed({"index": i, "delta": delta, "logprobs": lp, "finish_reason": piece.finish}, piece)

            # OpenAI's first chunk of each choice names the role.
            first = [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(choices)
            ]
            base = dict(base, object="chat.completion.chunk")
            return self.stream(handles, queue, choices, base, usage, include_usage, part, first)
        texts, lps, last = [""] * choices, [[] for _ in range(choices)], [None] * choices
        async for i, piece in self.pieces(handles, queue, choices, request):
            usage.add(i, piece)
            texts[i] += piece.text
            if top is not None:
                lps[i] += entries(piece)
            last[i] = piece
        out = [
            _failed(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": {"content": lps[i]} if top is not None else None,
                    "finish_reason": last[i].finish if last[i] else None,
                },
                last[i],
            )
            for i in range(choices)
        ]
        return dict(base, choices=out, usage=usage.json())

    def tokenize(self, body: TokenizeRequest) -> dict:
        """How text splits: ids, each token's text (or "bytes:..." when it cuts a character) and its
        [start, end) byte offsets in the UTF-8 text. Always plain text, like every prompt."""
        self.check_model(body.model)
        ids = self.tok.encode(body.text)
        offsets, at = [], 0
        for i in ids:
            n = len(self.tok.pieces[i])
            offsets.append([at, at + n])
            at += n
        return {
            "model": self.name,
            "count": len(ids),
            "bytes": at,
            "ids": ids,
            "pieces": [token_string(self.tok.pieces[i]) for i in ids],
            "offsets": offsets,
            "context_window": self.block,
        }

    def inspect(self, body: InspectRequest) -> dict:
        """inspect_text's views of one text (gradlm inspect): its tokens, the attention of every layer and head
        (rounded to 4 decimals), the top next tokens at each position and, with lens, each layer's guess."""
        self.check_model(body.model)
        if not 1 <= body.top <= 20:
            raise APIError(400, f"top must be between 1 and 20, got {body.top}", "top")
        try:
            views = inspect_text(self.lm.model, self.tok, body.text, k=body.top, lens=body.lens)
        except ConfigError as e:
            raise APIError(400, str(e), "text") from None
        views["attention"] = [
            [[[round(p, 4) for p in row] for row in head] for head in layer] for layer in views["attention"]
        ]
        return {"model": self.name, **views}

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "gradlm",
            "context_window": self.block,
        }


async def _watch_disconnect(request: HTTPRequest, queue: asyncio.Queue) -> None:
    """Put None on queue when the client disconnects (the request's body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait(None)
