"""Continuous batching: requests that arrive at any time share one running batch of the generation loop.

One thread owns the model and repeats a step:

  1. admit waiting requests while the batch has room: each prompt runs through the model once on its
     own (prefill), and its rows (n rows for n samples of one prompt) join the running batch's KV cache
     (GPT.join_caches: each row right-aligned, keeping its own left padding and rotary positions);
  2. pick every row's next token from its own logits, with its own sampling settings and its own
     random generator, so a seeded row writes the same text whatever it is batched with;
  3. turn each row's tokens into text at the edge (StreamDecoder: never half a character; StopMatcher:
     never any part of a stop string) and hand the new text to the request's callback;
  4. drop the rows that finished (an end token, a stop string, max_new_tokens, a cancelled request);
  5. feed the surviving rows' new tokens through the model in one batched forward (GPT.infer).

A request that arrives while others generate joins at the next step, and rows finish independently.
The waiting line is bounded: submit() raises BusyError when it is full. The model never sees more than
its context window: submit() refuses a prompt that, with max_new_tokens, would not fit.

    >>> engine = Engine(load("runs/demo")); engine.start()
    >>> engine.submit(Request(tok.encode("ROMEO:"), SamplingConfig(max_new_tokens=20, seed=1)), print)
"""

from __future__ import annotations

import collections
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from gradlm.errors import BusyError, ConfigError
from gradlm.generate import (
    LM,
    SamplingConfig,
    StopMatcher,
    Token,
    apply_penalties,
    next_token,
    penalties_active,
)
from gradlm.tokenizer import StreamDecoder


@dataclass
class Request:
    """What to generate: n samples continuing prompt (token ids).

    cfg.max_new_tokens counts per sample; cfg.stop holds stop strings; stop_ids end a sample when
    generated (e.g. <|endoftext|>, or <|end|> for chat). logprobs=None asks for no probabilities;
    logprobs=k gives each token's log probability and the k most likely alternatives, under the model's
    own distribution (log softmax of its logits, before penalties, temperature and top-k/p filters).
    """

    prompt: list[int]
    cfg: SamplingConfig
    n: int = 1
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None


class Piece(NamedTuple):
    """New output of one sample (index in 0..n-1), delivered as soon as it is safe to show.

    tokens are the generated tokens whose text is now wholly shown (Token.row is the sample index),
    offsets the character offset of each in the sample's text; tokens that spelled a stop string or
    ended the sample are never listed. finish is "stop" or "length" on a sample's last piece.
    generated counts every token the sample produced so far (usage)."""

    index: int
    text: str
    tokens: list[Token]
    offsets: list[int]
    finish: str | None
    generated: int


class Handle:
    """A submitted request: cancel() it when its client goes away (its rows leave at the next step)."""

    def __init__(self, engine: Engine, request: Request, on_piece: Callable[[Piece | Exception], None]):
        self.engine, self.request, self.on_piece = engine, request, on_piece
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.engine._forget(self)


class _Row:
    """One sample being generated: its random generator, penalty counts and text edge."""

    def __init__(self, lm: LM, handle: Handle, index: int):
        req = handle.request
        self.handle, self.index, self.cfg = handle, index, req.cfg
        self.stop_ids = req.stop_ids
        self.gen = torch.Generator()
        if req.cfg.seed is None:
            self.gen.seed()
        else:  # sample i of a request with seed s draws from seed s + i: the samples differ, reproducibly
            self.gen.manual_seed((req.cfg.seed + index) % 2**64)
        self.penalised = penalties_active(req.cfg)
        if self.penalised:
            V = lm.model.cfg.vocab_size
            self.seen = torch.zeros(1, V, dtype=torch.bool)
            self.seen[0, torch.tensor(req.prompt)] = True
            self.counts = torch.zeros(1, V)
        self.decoder, self.matcher = StreamDecoder(lm.tok), StopMatcher(req.cfg.stop)
        self.generated = 0
        self.decoded = 0  # characters the decoder has produced
        self.shown = 0  # characters handed out (the rest is held back as a possible stop string)
        # Tokens not wholly shown yet: [token, start, end] in characters of the text; end is None while
        # the token's bytes are part of an unfinished character (its text is not known yet).
        self.held: list[list] = []

    def pick(self, logits: torch.Tensor) -> int:
        """This row's next token from its logits (1, V)."""
        if self.penalised:
            logits = apply_penalties(logits, self.seen, self.counts, self.cfg)
        t = int(next_token(logits, self.cfg, self.gen))
        if self.penalised:
            self.seen[0, t] = True
            self.counts[0, t] += 1
        return t

    def accept(self, t: Token) -> Piece:
        """Take the next generated token; the text it makes safe to show."""
        self.generated += 1
        if t.id in self.stop_ids:
            return self._finish("", "stop")
        piece = self.decoder.push(t.id)
        self.held.append([t, self.decoded, None])
        self._decoded(piece, self.decoder.pending)
        text, hit = self.matcher.push(piece)
        if hit:
            return self._emit(text, "stop")
        if self.generated >= self.cfg.max_new_tokens:
            return self._finish(text, "length")
        return self._emit(text, None)

    def _finish(self, text: str, reason: str) -> Piece:
        """Generation ended: release what was held back (a cut character, a possible stop string)."""
        rest = self.decoder.flush()
        self._decoded(rest, False)
        tail, hit = self.matcher.push(rest)
        return self._emit(text + (tail if hit else tail + self.matcher.flush()), "stop" if hit else reason)

    def _decoded(self, text: str, pending: bool) -> None:
        """The decoder produced text; unless a character is still unfinished, every held token's text is known."""
        self.decoded += len(text)
        if not pending:
            for h in self.held:
                if h[2] is None:
                    h[2] = self.decoded

    def _emit(self, text: str, finish: str | None) -> Piece:
        self.shown += len(text)
        n = 0
        while n < len(self.held) and self.held[n][2] is not None and self.held[n][2] <= self.shown:
            n += 1
        done, self.held = self.held[:n], self.held[n:]
        return Piece(self.index, text, [t for t, _, _ in done], [s for _, s, _ in done], finish, self.generated)


class Engine:
    """Runs requests through one model with continuous batching (see the module docstring).

    max_batch: most rows (samples) decoded together; max_queue: most requests waiting to join.
    Callbacks run on the engine's thread and must return quickly (the server hands pieces to its
    event loop). start() runs the loop in a thread; step() runs one step by hand (tests).
    """

    def __init__(self, lm: LM, max_batch: int = 16, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0:
            raise ConfigError(f"max batch must be >= 1 and max queue >= 0, got {max_batch} and {max_queue}")
        self.lm, self.model = lm, lm.model
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting: collections.deque[Handle] = collections.deque()
        self._cond = threading.Condition()
        self._rows: list[_Row] = []
        self._cache = None  # KVCache of the running rows, in _rows order
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
        if len(request.prompt) + cfg.max_new_tokens > block:
            raise ConfigError(
                f"the prompt has {len(request.prompt)} tokens and asks for {cfg.max_new_tokens} more, "
                f"{len(request.prompt) + cfg.max_new_tokens} in all, but the context window is {block}"
            )
        if not 1 <= request.n <= self.max_batch:
            raise ConfigError(f"n must be between 1 and {self.max_batch} (the batch size), got {request.n}")
        if request.logprobs is not None and not 0 <= request.logprobs <= self.model.cfg.vocab_size:
            raise ConfigError(f"logprobs must be between 0 and the vocabulary size, got {request.logprobs}")
        handle = Handle(self, request, on_piece)
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise BusyError(f"{len(self._waiting)} requests are already waiting (the most this server queues); retry shortly")
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def _forget(self, handle: Handle) -> None:
        """A cancelled request leaves the waiting line at once; its running rows leave at the next step."""
        with self._cond:
            if handle in self._waiting:
                self._waiting.remove(handle)

    def stats(self) -> dict:
        return {"running": len(self._rows), "waiting": len(self._waiting), "steps": self.steps, "tokens": self.tokens}

    def start(self) -> None:
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
        caches = [self._cache] if self._rows else []
        logits = [self._logits] if self._rows else []
        rows = []
        try:
            for h in taken:
                prompt = torch.tensor([h.request.prompt], device=self.model.embed_tokens.weight.device)
                cache = self.model.new_cache(1, prompt.shape[1])
                first = self.model.infer(prompt, cache, last_only=True)[:, -1]  # (1, V)
                for i in range(h.request.n):  # n samples share the prompt's prefill
                    caches.append(cache)
                    logits.append(first)
                    rows.append(_Row(self.lm, h, i))
        except Exception as e:  # (a bug) these requests are in neither the line nor the batch: tell them
            for h in taken:
                h.on_piece(e)
            raise
        self._cache = self.model.join_caches(caches)  # room for the whole context window
        self._logits = torch.cat(logits)
        self._rows += rows

    def _decode(self) -> None:
        self._keep([b for b, row in enumerate(self._rows) if not row.handle.cancelled])  # clients that left
        if not self._rows:
            return
        rows, logits = self._rows, self._logits.float()
        ids = self._pick(rows, logits)
        keep = []
        for b, (row, t) in enumerate(zip(rows, self._with_logprobs(rows, logits, ids))):
            piece = row.accept(t)
            row.handle.on_piece(piece)
            if piece.finish is None:
                keep.append(b)
        self.steps += 1
        self.tokens += len(rows)
        self._keep(keep)  # finished rows leave the batch
        if not self._rows:
            return
        if self._cache.pos >= self._cache.max_len:
            # Rows that left kept their place: drop the padding every remaining row has (each row
            # holds at most block - 1 tokens here, as submit() checked prompt + max_new_tokens).
            self._cache = self.model.join_caches([self._cache])
        feed = torch.tensor([ids[b] for b in keep], device=self.model.embed_tokens.weight.device)[:, None]  # (rows, 1)
        self._logits = self.model.infer(feed, self._cache)[:, -1]

    def _pick(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token. Rows with the same filters (temperature, top-k, top-p, min-p) are drawn
        together, one batched call, each with a uniform number from its own seeded generator, so a row
        gets exactly the token it would get alone; rows with penalties (which keep per-row counts) go
        one at a time."""
        ids: list[int] = [0] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for b, row in enumerate(rows):
            if row.penalised:
                ids[b] = row.pick(logits[b : b + 1])
            else:
                c = row.cfg
                groups.setdefault((c.temperature, c.top_k, c.top_p, c.min_p), []).append(b)
        for members in groups.values():
            cfg = rows[members[0]].cfg
            uniform = None if cfg.temperature == 0 else torch.cat([torch.rand(1, generator=rows[b].gen) for b in members])[:, None]
            for b, t in zip(members, next_token(logits[members], cfg, uniform=uniform).tolist()):
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
        chosen = lp.gather(1, torch.tensor(ids)[:, None]).squeeze(1).tolist()
        k = max(k or 0 for k in wanted)
        best = lp.topk(k, dim=-1) if k else None
        best_v = best.values.tolist() if k else []
        best_i = best.indices.tolist() if k else []
        out = []
        for b, (r, t) in enumerate(zip(rows, ids)):
            if wanted[b] is None:
                out.append(Token(r.index, t))
            else:
                out.append(Token(r.index, t, chosen[b], tuple(zip(best_i[b][: wanted[b]], best_v[b][: wanted[b]])) if k else ()))
        return out
