"""`gradlm chat`: a multi-turn conversation with a model in the terminal.

    $ gradlm chat runs/drugqa-lora --temperature 0
    you> What is the maximum daily dose of queletidine?
    20 mg
    you> /reset

Each turn lays the whole conversation out with the chat template (gradlm/text/chat.py) and generates the
reply as one row of the engine (gradlm/generation/engine.py: the sampler, stop strings and the text edge every
entry point shares), streamed as it is written and stopped at <|end|>. The KV cache is kept between turns: it is rewound
to the longest prefix it shares
with the new conversation's ids, so usually only the new user message runs through the model. When
the conversation plus room for a reply no longer fits the context window, the oldest turns are
dropped (the system message stays) and the cache keeps only what still matches (the system message).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from gradlm.text.chat import Message, encode_chat, stop_ids
from gradlm.generation.constrain import Constraint
from gradlm.generation.engine import Request
from gradlm.errors import ConfigError, ConstraintError
from gradlm.generation.generate import LM
from gradlm.model.sampling import SamplingConfig


class ChatSession:
    """A conversation with a model that keeps its KV cache from turn to turn.

        >>> chat = ChatSession(load("runs/drugqa"), system="Answer briefly.", sampling=SamplingConfig(temperature=0))
        >>> "".join(chat.send("Max daily dose of zorvastatin?"))
        '40 mg'

    constraint (gradlm/generation/constrain.py) makes every reply fit a choice list, a regex, a JSON schema...
    """

    def __init__(
        self, lm: LM, system: str = "", sampling: SamplingConfig | None = None, constraint: Constraint | None = None
    ):
        self.lm, self.model, self.tok = lm, lm.model, lm.tok
        self.sampling = sampling or SamplingConfig()
        self.sampling.validate()
        self.stops = frozenset(stop_ids(self.tok))  # a TokenizerError when the tokenizer has no chat tokens
        self.constraint = constraint
        if constraint is not None:  # compiled now: a constraint that cannot compile fails before the first turn
            lm.engine.matchers(constraint, 1, self.stops)
        self.system: list[Message] = [{"role": "system", "content": system}] if system else []
        self.cache = None
        self.dropped = 0  # turns dropped so far to fit the window
        self.reset()

    def reset(self) -> None:
        """Start over: only the system message remains (the cache keeps it, for the next turn)."""
        self.turns: list[Message] = []
        self.reused = 0  # ids of the last prompt that the cache already held

    @property
    def messages(self) -> list[Message]:
        return self.system + self.turns

    @property
    def window(self) -> int:
        return self.model.cfg.block_size

    def send(self, text: str) -> Iterator[str]:
        """Add the user's message and stream the model's reply in pieces (never half a character).
        The reply, whole or as far as it got when the caller stopped reading, joins the conversation."""
        ids = self._prompt(self.turns + [{"role": "user", "content": text}])
        # Room for the reply inside the window, so the cache never has to slide in the middle of it.
        sampling = dataclasses.replace(
            self.sampling, max_new_tokens=min(self.sampling.max_new_tokens, self.window - len(ids))
        )
        cache = self._reuse(ids)
        reply = []
        try:
            if sampling.max_new_tokens < 1:
                return
            for _, piece in self.lm.engine.stream(
                [Request(ids, sampling, 1, self.stops, cache=cache, constraint=self.constraint)]
            ):
                if piece.token.id not in self.stops:
                    reply.append(piece.token.id)
                if piece.text:
                    yield piece.text
                if piece.error:  # the constraint failed while decoding: the reply so far does not fit it
                    raise ConstraintError(piece.error)
        finally:
            self._cached = (ids + reply)[: cache.pos]  # what the cache holds: the prompt and the reply fed so far
            content = [i for i in reply if i not in self.lm.engine.specials]  # a special token is never text
            self.turns.append({"role": "assistant", "content": self.tok.decode(content)})

    def _prompt(self, turns: list[Message]) -> list[int]:
        """The conversation's ids, ending with <|assistant|>. While it leaves less than
        min(max_new_tokens, window / 4) tokens for the reply, its oldest turns are dropped; the turns
        kept become the conversation (a message too long even alone changes nothing: ConfigError)."""
        room = min(self.sampling.max_new_tokens, self.window // 4)
        dropped = 0
        while True:
            ids = encode_chat(self.tok, self.system + turns)
            if len(ids) + room <= self.window or len(turns) == 1:
                break
            turns = turns[2 if turns[1]["role"] == "assistant" else 1 :]  # a user turn and its reply
            dropped += 1
        if len(ids) >= self.window:
            what = "the system message and your message take" if self.system else "your message takes"
            raise ConfigError(
                f"{what} {len(ids)} tokens, but the model's context window is {self.window}; write a shorter message"
            )
        self.turns, self.dropped = turns, self.dropped + dropped
        return ids

    def _reuse(self, ids: list[int]):
        """The KV cache rewound to the longest prefix it shares with ids (leaving at least one id to run),
        or a new cache when nothing is shared."""
        n = 0
        if self.cache is not None:
            cached = self._cached
            limit = min(len(cached), len(ids) - 1)
            while n < limit and cached[n] == ids[n]:
                n += 1
        if n == 0:
            self.cache = self.model.new_cache(1, self.window)
        self.cache.pos = n  # keys and values past n are overwritten as the conversation goes on
        self.reused = n
        return self.cache


def chat_loop(
    session: ChatSession,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
    err: TextIO | None = None,
    interactive: bool = False,
) -> None:
    """Read user messages line by line (read = input), print each reply as it streams to out (stdout)
    and notes to err (stderr). /reset starts over, /quit (or the end of input) leaves. interactive
    shows a "you> " prompt."""
    out, err = out or sys.stdout, err or sys.stderr
    while True:
        try:
            line = read("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            session.reset()
            print("(new conversation)", file=err)
            continue
        if text.startswith("/"):
            print(f"unknown command {text}: /reset starts over, /quit leaves", file=err)
            continue
        dropped = session.dropped
        try:
            for piece in session.send(text):
                out.write(piece)
                out.flush()
        except (ConfigError, ConstraintError) as e:
            print(f"error: {e}", file=err)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
        if session.dropped > dropped:
            print(
                f"(the conversation outgrew the context window of {session.window} tokens: dropped its oldest turns)",
                file=err,
            )
