"""The one decode engine: every row that generate, chat, eval --qa and the server write is stepped here.
(Training's evaluation samples are a short decode of their own, gradlm/training/monitor.py: training may not import
inference.)

Rows are decoded together in one running batch (continuous batching): a request joins at the next step
and each of its rows leaves when it finishes, so rows never wait for one another. One step:

  1. admit waiting requests while the batch has room: their prompts run through the model together
     (left-padded prefill; a request that continues a KV cache runs only its new ids), and their rows
     (n rows for n samples of one prompt) join the running batch's cache (each row right-aligned,
     keeping its own padding and rotary positions);
  2. pick every row's next token from its own logits with the sampler (gradlm/model/sampling.py), its own
     settings and its own random generator, so a seeded row writes the same text whatever it is
     batched with;
  3. turn each row's tokens into text at the one text edge (_Row): never half a character
     (StreamDecoder), never any part of a stop string (StopMatcher), never a special token as text;
     hand the new text to the request's callback as a Piece;
  4. drop the rows that finished (a stop id, a stop string, max_new_tokens, a cancelled request);
  5. feed the surviving rows' new tokens through the model in one batched forward. When a row's
     context fills the window it slides (if its request allows): it keeps its newest half, re-run
     once, exactly as it would alone.

Who drives it: the server starts a thread that steps while there is work (start/stop); everything
else drives it synchronously through stream()/run() ("admit these rows, step until they are done"):
`gradlm generate` and the LM API (gradlm/generation/generate.py), `gradlm chat` (gradlm/generation/session.py) and QA
evaluation. The engine owns the inference fast path and its weight copies (gradlm/model/infer.py).

    >>> engine = Engine(model, tok)
    >>> [p.text for _, p in engine.stream([Request(tok.encode("ROMEO:"), SamplingConfig(max_new_tokens=5, seed=1))])]
"""

from __future__ import annotations

import collections
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from gradlm.generation.constrain import Constraint, Guide, constraint_failed, mask_logits
from gradlm.errors import BusyError, ConfigError
from gradlm.model.infer import Forward
from gradlm.model.transformer import Transformer, KVCache
from gradlm.runtime import Runtime
from gradlm.model.sampling import SamplingConfig, apply_penalties, next_token, penalties_active
from gradlm.text.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Request:
    """What to generate: n samples continuing prompt (token ids).

    cfg.max_new_tokens counts per sample; cfg.stop holds stop strings; stop_ids end a sample when
    generated (e.g. <|endoftext|>, or <|end|> for chat). logprobs=None asks for no probabilities;
    logprobs=k gives each token's log probability and the k most likely alternatives, under the model's
    own distribution (log softmax of its logits, before penalties, temperature and top-k/p filters).
    slide: a row whose context fills the window keeps its newest half and goes on; without it, a
    prompt that with max_new_tokens would not fit is refused.
    cache: a one-row KV cache that already holds the first cache.pos ids of the prompt (n = 1): only the
    rest runs through the model, and when the row ends the cache holds the prompt and every generated
    token but the last (a chat keeps its conversation so). A row that slid leaves it at pos 0.
    constraint: what the output must be (gradlm/generation/constrain.py: choices, regex, JSON schema, any JSON object,
    Lark grammar). Tokens that cannot come next are masked before every sampling control, a stop id is
    allowed only where the output is complete, and the row ends ("stop") once nothing more can follow.
    """

    prompt: list[int]
    cfg: SamplingConfig
    n: int = 1
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    slide: bool = False
    cache: KVCache | None = None
    constraint: Constraint | None = None


class Token(NamedTuple):
    """One generated token of one row. logprob and top (the best alternatives, (id, logprob) pairs)
    are under the model's own distribution, log softmax of its logits, before any sampling control;
    they are filled in only when logprobs were asked for."""

    row: int
    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


class Piece(NamedTuple):
    """New output of one sample (index in 0..n-1) after one step, delivered as soon as it is safe to show.

    token is the token this step generated (every one, including a stop id or one that spelled a stop
    string). tokens are the generated tokens whose text is now wholly shown (Token.row is the sample
    index), offsets the character offset of each in the sample's text; tokens that spelled a stop string
    or ended the sample are never listed. finish is "stop" or "length" on a sample's last piece, or "error"
    when the request's constraint failed while decoding: then error says why, and the text so far does not
    fit the constraint. generated counts every token the sample produced so far (usage)."""

    index: int
    text: str
    tokens: list[Token]
    offsets: list[int]
    finish: str | None
    generated: int
    token: Token
    error: str | None = None


class StopMatcher:
    """Finds stop strings in text that arrives in pieces, holding back what might be the start of one.

    push(piece) returns (text that is safe to show, whether a stop string was found). The held-back
    text is the longest tail that is a prefix of some stop string; it is released as soon as the next
    piece shows it is not one, or by flush() when generation ends for another reason.

        >>> m = StopMatcher(["\\n\\n"])
        >>> m.push("Hello\\n"), m.push("\\nmore")
        (('Hello', False), ('', True))
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        hold = 0
        for n in range(min(len(text), self.longest - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                hold = n
                break
        self.pending = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


class Handle:
    """A submitted request: cancel() it when its client goes away (its rows leave at the next step)."""

    def __init__(self, engine: Engine, request: Request, on_piece: Callable[[Piece | Exception], None]):
        self.engine, self.request, self.on_piece = engine, request, on_piece
        self.cancelled = False
        self.matchers: list = []  # one per row when the request has a constraint

    def cancel(self) -> None:
        self.cancelled = True
        self.engine._forget(self)


class _Row:
    """One sample being generated: its ids, random generator, penalty counts and the text edge."""

    def __init__(self, engine: Engine, handle: Handle, index: int):
        req = handle.request
        self.handle, self.index, self.cfg = handle, index, req.cfg
        self.constraint = handle.matchers[index] if handle.matchers else None  # its llguidance matcher
        self.stop_ids, self.specials = req.stop_ids, engine.specials
        self.ids = list(req.prompt)  # prompt + generated: what a sliding window re-runs
        self.slid = False
        self.gen = torch.Generator()
        # Sample i of a request with seed s draws from seed s + i: the samples differ, reproducibly. Without
        # a seed, the seed comes from torch's global generator (torch.manual_seed makes it reproducible).
        seed = req.cfg.seed if req.cfg.seed is not None else int(torch.randint(2**62, ()))
        self.gen.manual_seed((seed + index) % 2**64)
        self.penalised = penalties_active(req.cfg)
        if self.penalised:
            V, device = engine.model.cfg.vocab_size, engine.device
            self.seen = torch.zeros(1, V, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(req.prompt, device=device)] = True
            self.counts = torch.zeros(1, V, device=device)
        self.decoder, self.matcher = StreamDecoder(engine.tok), StopMatcher(req.cfg.stop)
        self.generated = 0
        self.decoded = 0  # characters the decoder has produced
        self.shown = 0  # characters handed out (the rest is held back as a possible stop string)
        # Tokens not wholly shown yet: [token, start, end] in characters of the text; end is None while
        # the token's bytes are part of an unfinished character (its text is not known yet).
        self.held: list[list] = []

    def pick(self, logits: torch.Tensor) -> int:
        """This row's next token from its logits (1, V), with its penalties."""
        logits = apply_penalties(logits, self.seen, self.counts, self.cfg)
        # The row's generator lives on the CPU (the same draws on every device); draw() moves the number.
        uniform = None if self.cfg.temperature == 0 else torch.rand(1, 1, generator=self.gen)
        t = int(next_token(logits, self.cfg, uniform=uniform))
        self.seen[0, t] = True
        self.counts[0, t] += 1
        return t

    def accept(self, t: Token) -> Piece:
        """Take the next generated token; the text it makes safe to show."""
        self.generated += 1
        self.ids.append(t.id)
        complete = False
        if self.constraint is not None:
            self.constraint.consume_token(t.id)
            if self.constraint.is_error():  # it gave up (a limit of its own, say): stopped, but not complete
                return self._finish(
                    "", "error", t, constraint_failed(self.handle.request.constraint, self.constraint.get_error())
                )
            complete = self.constraint.is_stopped()  # the output is whole and nothing more may follow
        if t.id in self.stop_ids:
            return self._finish("", "stop", t)
        # A special token (<|user|>, <|end|> where it is not a stop id...) is never text that looks typed.
        piece = "" if t.id in self.specials else self.decoder.push(t.id)
        self.held.append([t, self.decoded, None])
        self._decoded(piece, self.decoder.pending)
        text, hit = self.matcher.push(piece)
        if hit:
            return self._emit(text, "stop", t)
        if complete:
            return self._finish(text, "stop", t)
        if self.generated >= self.cfg.max_new_tokens:
            return self._finish(text, "length", t)
        return self._emit(text, None, t)

    def _finish(self, text: str, reason: str, t: Token, error: str | None = None) -> Piece:
        """Generation ended: release what was held back (a cut character, a possible stop string)."""
        rest = self.decoder.flush()
        self._decoded(rest, False)
        tail, hit = self.matcher.push(rest)
        return self._emit(
            text + (tail if hit else tail + self.matcher.flush()), "stop" if hit and not error else reason, t, error
        )

    def _decoded(self, text: str, pending: bool) -> None:
        """The decoder produced text; unless a character is still unfinished, every held token's text is known."""
        self.decoded += len(text)
        if not pending:
            for h in self.held:
                if h[2] is None:
                    h[2] = self.decoded

    def _emit(self, text: str, finish: str | None, t: Token, error: str | None = None) -> Piece:
        self.shown += len(text)
        n = 0
        while n < len(self.held) and self.held[n][2] is not None and self.held[n][2] <= self.shown:
            n += 1
        done, self.held = self.held[:n], self.held[n:]
        return Piece(self.index, text, [h[0] for h in done], [h[1] for h in done], finish, self.generated, t, error)


MAX_BATCH = 16  # rows decoded together by default (the server's --max-batch)
MAX_QUEUE = 64  # requests waiting by default; the server answers more with 503 (--max-queue)


class Engine:
    """Runs requests through one model with continuous batching (see the module docstring).

    max_batch: most rows (samples) decoded together; max_queue: most requests waiting to join; runtime: the
    command's --dtype int8 (multiply by int8 copies of the weights, gradlm/model/infer.py) and --compile.
    Callbacks run on the thread that steps and must return quickly (the server hands pieces to its
    event loop). start() steps in a thread of its own; stream()/run() step in the caller's.
    """

    def __init__(
        self,
        model: Transformer,
        tok: Tokenizer,
        max_batch: int = MAX_BATCH,
        max_queue: int = MAX_QUEUE,
        runtime: Runtime | None = None,
    ):
        if max_batch < 1 or max_queue < 0:
            raise ConfigError(f"max batch must be >= 1 and max queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.tok = model, tok
        rt = runtime or Runtime(str(model.embed_tokens.weight.device))
        # the fast path in inference mode; owns its weight copies
        self.forward = Forward(model, int8=rt.dtype == "int8", compile=rt.compile, step=rt.decode_step)
        self.device = model.embed_tokens.weight.device
        self.guide: Guide | None = None  # compiles constraints, made on the first request that has one
        self.specials = frozenset(tok.specials.values())
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting: collections.deque[Handle] = collections.deque()
        self._cond = threading.Condition()
        self._rows: list[_Row] = []
        self._cache: KVCache | None = None  # the running rows' keys and values, in _rows order
        self._logits: torch.Tensor | None = None  # (rows, V): each row's next-token logits
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.tokens = 0

    # ---- the caller's side -------------------------------------------------------------------------

    def submit(self, request: Request, on_piece: Callable[[Piece | Exception], None]) -> Handle:
        """Queue a request; on_piece gets its Pieces (or an Exception if the engine fails)."""
        cfg = request.cfg
        cfg.validate()
        block = self.model.cfg.block_size
        if not request.prompt:
            raise ConfigError("the prompt is empty: give at least one token")
        if cfg.max_new_tokens < 1:
            raise ConfigError(f"max new tokens must be at least 1, got {cfg.max_new_tokens}")
        if len(request.prompt) > block or (not request.slide and len(request.prompt) + cfg.max_new_tokens > block):
            raise ConfigError(
                f"the prompt has {len(request.prompt)} tokens and asks for {cfg.max_new_tokens} more, "
                f"{len(request.prompt) + cfg.max_new_tokens} in all, but the context window is {block}"
            )
        if not 1 <= request.n <= self.max_batch:
            raise ConfigError(f"n must be between 1 and {self.max_batch} (the batch size), got {request.n}")
        if request.logprobs is not None and not 0 <= request.logprobs <= self.model.cfg.vocab_size:
            raise ConfigError(f"logprobs must be between 0 and the vocabulary size, got {request.logprobs}")
        c = request.cache
        if c is not None and (
            request.n != 1 or c.kv.shape[1] != 1 or c.pad is not None or not 0 <= c.pos < len(request.prompt)
        ):
            raise ValueError(
                "a continued KV cache must have one unpadded row holding fewer ids than the prompt, for n = 1"
            )
        handle = Handle(self, request, on_piece)
        if request.constraint is not None:
            handle.matchers = self.matchers(request.constraint, request.n, request.stop_ids)
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise BusyError(
                    f"{len(self._waiting)} requests are already waiting (the most this server queues); retry shortly"
                )
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def matchers(self, constraint: Constraint, n: int, stop_ids: Iterable[int]) -> list:
        """n rows' matchers for constraint (gradlm/generation/constrain.py); a ConfigError when it cannot compile."""
        self.guide = self.guide or Guide(self.tok, self.model.cfg.vocab_size)
        return self.guide.matchers(constraint, n, stop_ids)

    def stream(self, requests: list[Request]) -> Iterator[tuple[int, Piece]]:
        """Synchronously: admit these requests and step until every row is done, yielding (request
        index, Piece) as they come. Leaving the loop early cancels what is left."""
        out: collections.deque = collections.deque()
        handles: list[Handle] = []
        try:
            for i, r in enumerate(requests):
                handles.append(self.submit(r, lambda piece, i=i: out.append((i, piece))))
            left = sum(r.n for r in requests)
            while left:
                if not out:
                    self.step()
                while out:
                    i, piece = out.popleft()
                    if isinstance(piece, Exception):
                        raise piece
                    left -= piece.finish is not None
                    yield i, piece
        finally:
            for h in handles:
                h.cancel()

    def run(self, requests: list[Request]) -> list[list[Piece]]:
        """Synchronously: every request's pieces, in order, once all are done."""
        out: list[list[Piece]] = [[] for _ in requests]
        for i, piece in self.stream(requests):
            out[i].append(piece)
        return out

    def _forget(self, handle: Handle) -> None:
        """A cancelled request leaves the waiting line at once; its running rows leave at the next step."""
        with self._cond:
            if handle in self._waiting:
                self._waiting.remove(handle)

    def stats(self) -> dict:
        return {"running": len(self._rows), "waiting": len(self._waiting), "steps": self.steps, "tokens": self.tokens}

    def start(self) -> None:
        """Run the loop in a thread of its own (the server's way). The inference weights (and the compiled step,
        when the runtime asks for it) are made now, not at the first request."""
        self.forward.check()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gradlm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._rows and not self._waiting:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a bug: fail the requests in flight rather than leave them hanging
                traceback.print_exc()
                self._fail_all(e)

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            handles = {id(r.handle): r.handle for r in self._rows}
            handles.update({id(h): h for h in self._waiting})
            self._waiting.clear()
        self._rows, self._cache, self._logits = [], None, None
        for h in handles.values():
            h.on_piece(error)

    # ---- the loop ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """One step: admit waiting requests, then pick, deliver and feed one token per running row."""
        self._admit()
        if self._rows:
            self._decode()

    def _admit(self) -> None:
        taken: list[Handle] = []
        with self._cond:
            room = self.max_batch - len(self._rows)
            while self._waiting and self._waiting[0].request.n <= room:
                h = self._waiting.popleft()
                room -= h.request.n
                taken.append(h)
        if not taken:
            return
        try:
            self.forward.check()  # the model's weights may have changed since the last admission
            parts, logits = self._prefill(taken)
            rows = [_Row(self, h, i) for h in taken for i in range(h.request.n)]
        except Exception as e:  # (a bug) these requests are in neither the line nor the batch: tell them
            for h in taken:
                h.on_piece(e)
            raise
        if self._rows:
            parts = [(self._cache, b) for b in range(len(self._rows))] + parts
            logits = torch.cat([self._logits, logits])
        self._rows += rows
        self._cache = self._join(parts)
        self._logits = logits

    def _prefill(self, taken: list[Handle]) -> tuple[list[tuple[KVCache, int]], torch.Tensor]:
        """Run the new requests' prompts through the model: (cache, row) of each new row, in order, and
        their last logits (rows, V). Fresh prompts go together, left-padded, in one forward; a request
        continuing a KV cache runs only its new ids, in that cache."""
        fresh = [h for h in taken if h.request.cache is None]
        where: dict[int, tuple[KVCache, int, torch.Tensor]] = {}
        if fresh:
            prompts = [h.request.prompt for h in fresh]
            P = max(map(len, prompts))
            x = torch.zeros(len(prompts), P, dtype=torch.long)
            for b, p in enumerate(prompts):
                x[b, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            pad = [P - len(p) for p in prompts]
            cache = self.model.new_cache(len(prompts), P, pad=pad if any(pad) else None)
            last = self.forward(x.to(self.device), cache, last_only=True)[:, -1]
            for b, h in enumerate(fresh):
                where[id(h)] = (cache, b, last[b : b + 1])
        for h in taken:
            c = h.request.cache
            if c is not None:
                ids = torch.tensor([h.request.prompt[c.pos :]], device=self.device)
                where[id(h)] = (c, 0, self.forward(ids, c, last_only=True)[:, -1])
        parts, logits = [], []
        for h in taken:
            cache, b, last = where[id(h)]
            parts += [(cache, b)] * h.request.n  # n samples share the prompt's prefill
            logits += [last] * h.request.n
        return parts, torch.cat(logits)

    def _join(self, parts: list[tuple[KVCache, int]], lengths: list[int] | None = None) -> KVCache:
        """One cache holding these (cache, row) rows in order: the running rows (self._rows), each row's
        newest lengths[i] (default: all its) keys and values copied right-aligned, so pos becomes the longest
        row's length and padding every row had is dropped; rows keep their rotary positions (keys are stored
        rotated, and padding counts from the left). Its room: what the rows can still feed (each feeds at most
        its tokens still to generate, so the cache fills only when they are done), up to the context window,
        where a row that goes on slides (_make_room)."""
        if lengths is None:
            lengths = [c.lengths()[b] for c, b in parts]
        P = max(lengths, default=0)
        pad = [P - n for n in lengths]
        room = max((r.cfg.max_new_tokens - r.generated for r in self._rows), default=1)
        new = self.model.new_cache(len(parts), min(self.model.cfg.block_size, P + room), pad=pad if any(pad) else None)
        for i, ((c, b), n) in enumerate(zip(parts, lengths)):
            if n:
                new.kv[:, i, :, P - n : P] = c.kv[:, b, :, c.pos - n : c.pos]
        new.pos = P
        return new

    def _decode(self) -> None:
        self._keep([b for b, row in enumerate(self._rows) if not row.handle.cancelled])  # clients that left
        if not self._rows:
            return
        rows, logits = self._rows, self._logits.float()
        ids = self._pick(rows, logits)
        keep = []
        for b, (row, t) in enumerate(zip(rows, self._with_logprobs(rows, logits, ids))):
            piece = row.accept(t)
            if piece.finish is not None:
                self._give_back_cache(b, row)
            row.handle.on_piece(piece)
            if piece.finish is None:
                keep.append(b)
        self.steps += 1
        self.tokens += len(rows)
        self._keep(keep)  # finished rows leave the batch
        if not self._rows:
            return
        if self._cache.pos >= self._cache.max_len:
            self._make_room()
        feed = torch.tensor([row.ids[-1] for row in self._rows], device=self.device)[:, None]  # (rows, 1)
        self._logits = self.forward(feed, self._cache)[:, -1]

    def _make_room(self) -> None:
        """The cache is full. Rows that left kept their place: drop the padding every remaining row has.
        A row whose own context fills the window slides: it keeps its newest block // 2 - 1 ids (its
        newest token is fed next), re-run through the model from rotary position 0; the other rows keep
        their keys and values. So a row slides exactly when, and as, it would alone."""
        block = self.model.cfg.block_size
        lengths = self._cache.lengths()
        full = [b for b, n in enumerate(lengths) if n >= block]
        keep = max(1, block // 2) - 1
        parts = [(self._cache, b) for b in range(len(self._rows))]
        if full and keep:
            sub = self.model.new_cache(len(full), keep)
            self.forward(
                torch.tensor([self._rows[b].ids[-keep - 1 : -1] for b in full], device=self.device), sub, last_only=True
            )
            for i, b in enumerate(full):
                parts[b] = (sub, i)
        for b in full:
            lengths[b] = keep
            self._rows[b].slid = True
        self._cache = self._join(parts, lengths)

    def _give_back_cache(self, b: int, row: _Row) -> None:
        """A finished row that continued a request's KV cache leaves its keys and values there."""
        c = row.handle.request.cache
        if c is None:
            return
        n = self._cache.lengths()[b]
        if row.slid or n > c.max_len:
            c.pos = 0
            return
        c.kv[:, 0, :, :n] = self._cache.kv[:, b, :, self._cache.pos - n : self._cache.pos]
        c.pos = n

    def _pick(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token. Rows with the same filters (temperature, top-k, top-p, min-p) are drawn
        together, one batched call, each with a uniform number from its own seeded generator, so a row
        gets exactly the token it would get alone; rows with penalties (which keep per-row counts) go
        one at a time. Rows with a constraint first have the tokens it forbids masked (-inf); the other
        rows' logits are left as they are."""
        ids: list[int] = [0] * len(rows)
        constrained = [b for b, row in enumerate(rows) if row.constraint is not None]
        if constrained:
            raw, logits = logits, logits.clone()
            logits[constrained] = mask_logits(logits[constrained], [rows[b].constraint for b in constrained])
            for b in constrained:  # a matcher that failed computing its mask may allow nothing: the row draws
                if rows[b].constraint.is_error():  # from its own logits, and accept() ends it with the error
                    logits[b] = raw[b]
        groups: dict[tuple, list[int]] = {}
        for b, row in enumerate(rows):
            if row.penalised:
                ids[b] = row.pick(logits[b : b + 1])
            else:
                c = row.cfg
                groups.setdefault((c.temperature, c.top_k, c.top_p, c.min_p), []).append(b)
        for members in groups.values():
            cfg = rows[members[0]].cfg
            uniform = (
                None
                if cfg.temperature == 0
                else torch.cat([torch.rand(1, generator=rows[b].gen) for b in members])[:, None]
            )
            same = logits if len(members) == len(rows) else logits[members]  # one group: no gather (~5-20 us)
            for b, t in zip(members, next_token(same, cfg, uniform=uniform).tolist()):
                ids[b] = t
        return ids

    def _keep(self, keep: list[int]) -> None:
        """Only these rows (batch indices) stay in the batch: their cache rows, logits and state."""
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._logits = [], None, None
            return
        self._cache.reorder(torch.tensor(keep))
        self._logits = self._logits[keep]
        self._rows = [self._rows[b] for b in keep]

    def _with_logprobs(self, rows: list[_Row], logits: torch.Tensor, ids: list[int]) -> list[Token]:
        """Each row's Token, with its log probability and alternatives when the row's request asks."""
        wanted = [r.handle.request.logprobs for r in rows]
        if all(k is None for k in wanted):
            return [Token(r.index, t) for r, t in zip(rows, ids)]
        lp = torch.log_softmax(logits, dim=-1)  # the model's own distribution, before any sampling control
        chosen = lp.gather(1, torch.tensor(ids, device=lp.device)[:, None]).squeeze(1).tolist()
        k = max(k or 0 for k in wanted)
        best = lp.topk(k, dim=-1) if k else None
        best_v = best.values.tolist() if k else []
        best_i = best.indices.tolist() if k else []
        out = []
        for b, (r, t) in enumerate(zip(rows, ids)):
            if wanted[b] is None:
                out.append(Token(r.index, t))
            else:
                out.append(
                    Token(
                        r.index, t, chosen[b], tuple(zip(best_i[b][: wanted[b]], best_v[b][: wanted[b]])) if k else ()
                    )
                )
        return out
