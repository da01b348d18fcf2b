"""Continuous batching: requests join a running batch at the next step, rows finish on their own, a row's
text is what it would be alone, cancelled requests leave at once, the waiting line is bounded."""

from __future__ import annotations

import pytest
import torch

from gradlm.generation.engine import Engine, Request
from gradlm.errors import BusyError, ConfigError
from gradlm.generation.generate import LM, SamplingConfig

from conftest import CYCLE, cycle_model, fit, tiny_config

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice


@pytest.fixture(scope="module")
def tlm(tok, small_text):
    """A tiny model trained for a moment on Shakespeare (varied, realistic next-token distributions)."""
    from gradlm.model.transformer import Transformer

    torch.manual_seed(0)
    m = Transformer(tiny_config(tok.vocab_size, n_kv_head=2, block_size=64))
    m.reset_parameters(seed=0)
    fit(m, torch.tensor(tok.encode(small_text[:30000])), 100)
    return LM(m, tok)


@pytest.fixture(scope="module")
def cycle(tok):
    return LM(cycle_model(tok), tok)


class Collect:
    """A request's pieces as the engine delivers them."""

    def __init__(self):
        self.pieces = []

    def __call__(self, piece):
        self.pieces.append(piece)

    def text(self, index: int = 0) -> str:
        return "".join(p.text for p in self.pieces if p.index == index)

    def finish(self, index: int = 0):
        return [p.finish for p in self.pieces if p.index == index and p.finish][-1:] or [None]


def run_until_idle(engine: Engine, limit: int = 1000) -> None:
    for _ in range(limit):
        if not engine.stats()["running"] and not engine.stats()["waiting"]:
            return
        engine.step()
    raise AssertionError("the engine did not finish")


def test_requests_joining_at_different_steps_write_what_they_would_alone(tlm):
    engine = Engine(tlm.model, tlm.tok, max_batch=8)
    prompts = ["ROMEO:", "To be or not", "KING HENRY:\nWhat say", "a"]
    outs = []
    for i, p in enumerate(prompts):  # each joins a batch already running, two steps after the previous
        cfg = SamplingConfig(max_new_tokens=15 + 6 * i, temperature=0.9, top_k=40, seed=i)
        outs.append(Collect())
        engine.submit(Request(tlm.tok.encode(p), cfg), outs[-1])
        engine.step()
        engine.step()
    run_until_idle(engine)
    for i, p in enumerate(prompts):
        assert outs[i].text() == tlm.generate(p, max_new_tokens=15 + 6 * i, temperature=0.9, top_k=40, seed=i)
        assert outs[i].finish() == ["length"] and outs[i].pieces[-1].generated == 15 + 6 * i


def test_a_new_request_joins_at_the_next_step_and_rows_finish_on_their_own(cycle):
    engine, tok = Engine(cycle.model, cycle.tok, max_batch=4), cycle.tok
    a, b = Collect(), Collect()
    engine.submit(Request(tok.encode("H"), SamplingConfig(max_new_tokens=5, temperature=0)), a)
    engine.step()
    engine.step()
    engine.submit(Request(tok.encode("H"), SamplingConfig(max_new_tokens=12, temperature=0)), b)
    engine.step()  # b is prefilled and decoded in the same step as a's third token
    assert len(a.pieces) == 3 and len(b.pieces) == 1 and engine.stats()["running"] == 2
    engine.step()
    engine.step()  # a's fifth token: a leaves, b goes on
    assert a.finish() == ["length"] and engine.stats()["running"] == 1
    run_until_idle(engine)
    assert b.text() == cycle.generate("H", max_new_tokens=12, temperature=0)
    assert engine.stats()["steps"] == 2 + 12  # twelve steps of b, two of them before it came


def test_n_samples_share_a_prompt_and_draw_from_seed_plus_index(tlm):
    engine = Engine(tlm.model, tlm.tok, max_batch=8)
    out = Collect()
    engine.submit(
        Request(tlm.tok.encode("ROMEO:"), SamplingConfig(max_new_tokens=20, temperature=1.0, seed=3), n=3), out
    )
    run_until_idle(engine)
    texts = [out.text(i) for i in range(3)]
    assert texts == [tlm.generate("ROMEO:", max_new_tokens=20, temperature=1.0, seed=3 + i) for i in range(3)]
    assert len(set(texts)) == 3


def test_stop_strings_and_stop_ids_end_a_row_and_are_never_shown(cycle):
    engine, tok = Engine(cycle.model, cycle.tok), cycle.tok
    stop, end, last = Collect(), Collect(), Collect()
    engine.submit(Request(tok.encode("H"), SamplingConfig(max_new_tokens=30, temperature=0, stop=("é!",))), stop)
    engine.submit(
        Request(tok.encode("H"), SamplingConfig(max_new_tokens=30, temperature=0), stop_ids=frozenset(tok.encode("!"))),
        end,
    )
    # A possible stop string is held back, then released when generation ends another way.
    engine.submit(Request(tok.encode("H"), SamplingConfig(max_new_tokens=6, temperature=0, stop=("🙂X",))), last)
    run_until_idle(engine)
    assert (stop.text(), stop.finish()) == ("i 🙂", ["stop"])
    assert (end.text(), end.finish()) == ("i 🙂é", ["stop"])
    assert (last.text(), last.finish()) == ("i 🙂", ["length"])
    # Tokens are listed once their text is wholly shown; the stop string's tokens never are.
    listed = [t.id for p in stop.pieces for t in p.tokens]
    assert tok.decode(listed) == "i 🙂"


def test_logprobs_are_the_models_own_distribution(cycle):
    engine, tok = Engine(cycle.model, cycle.tok), cycle.tok
    out = Collect()
    prompt = tok.encode("H")
    engine.submit(Request(prompt, SamplingConfig(max_new_tokens=4, temperature=0.5, top_k=2, seed=0), logprobs=3), out)
    run_until_idle(engine)
    tokens = [t for p in out.pieces for t in p.tokens]
    ids = prompt + [t.id for t in tokens]
    with torch.no_grad():
        ref = torch.log_softmax(cycle.model(torch.tensor([ids]))[0].float(), -1)  # (T, V), no sampling controls
    for k, t in enumerate(tokens):
        row = ref[len(prompt) - 1 + k]
        assert t.logprob == pytest.approx(float(row[t.id]), abs=1e-4)
        assert [i for i, _ in t.top] == row.topk(3).indices.tolist()


def test_cancel_frees_the_slot_at_once(cycle):
    engine, tok = Engine(cycle.model, cycle.tok, max_batch=1, max_queue=1), cycle.tok
    first, second = Collect(), Collect()
    h1 = engine.submit(Request(tok.encode("H"), SamplingConfig(max_new_tokens=50, temperature=0)), first)
    engine.step()
    h2 = engine.submit(Request(tok.encode("H"), SamplingConfig(max_new_tokens=50, temperature=0)), second)
    with pytest.raises(BusyError, match="waiting"):  # the batch (1 row) and the line (1 request) are full
        engine.submit(Request(tok.encode("H"), SamplingConfig(max_new_tokens=5)), Collect())
    h2.cancel()  # a waiting request leaves the line at once
    assert engine.stats() == dict(engine.stats(), running=1, waiting=0)
    h1.cancel()
    engine.step()  # a running one leaves at the next step
    assert engine.stats()["running"] == 0 and len(first.pieces) == 1 and not second.pieces
    assert h1.cancelled and h2.cancelled


def test_requests_that_cannot_fit_are_refused_with_their_numbers(cycle):
    engine, tok = Engine(cycle.model, cycle.tok, max_batch=2), cycle.tok
    with pytest.raises(ConfigError, match=r"5 tokens and asks for 60 more, 65 in all, but the context window is 64"):
        engine.submit(Request(tok.encode("H") * 5, SamplingConfig(max_new_tokens=60)), Collect())
    with pytest.raises(ConfigError, match="n must be between 1 and 2"):
        engine.submit(Request(tok.encode("H"), SamplingConfig(max_new_tokens=5), n=3), Collect())
    with pytest.raises(ConfigError, match="temperature"):
        engine.submit(Request(tok.encode("H"), SamplingConfig(temperature=-1)), Collect())
    with pytest.raises(ConfigError, match="empty"):
        engine.submit(Request([], SamplingConfig(max_new_tokens=5)), Collect())


def test_the_engine_thread_serves_requests_and_stops(cycle):
    import threading

    engine, tok = Engine(cycle.model, cycle.tok, max_batch=4), cycle.tok
    engine.start()
    try:
        done = threading.Event()
        outs = [Collect() for _ in range(6)]

        def collect(out):
            def on_piece(piece):
                out(piece)
                if all(o.finish() != [None] for o in outs):
                    done.set()

            return on_piece

        for i, out in enumerate(outs):  # more requests than rows: the rest wait, then join
            engine.submit(Request(tok.encode("H"), SamplingConfig(max_new_tokens=10 + i, temperature=0)), collect(out))
        assert done.wait(30)
        for i, out in enumerate(outs):
            assert out.text() == cycle.generate("H", max_new_tokens=10 + i, temperature=0)
            assert out.text().startswith(CYCLE[1:]) and out.pieces[-1].generated == 10 + i
    finally:
        engine.stop()


# ---- infer.decode: the one-row decoder training's samples use (training may not import the engine) ------------


def _engine_ids(lm: LM, prompt: list[int], cfg: SamplingConfig) -> tuple[list[int], Engine]:
    engine, out = Engine(lm.model, lm.tok), Collect()
    engine.submit(Request(prompt, cfg), out)
    run_until_idle(engine)
    return [p.token.id for p in out.pieces], engine


def test_decode_picks_the_engines_tokens(tlm):
    from gradlm.model.infer import decode

    prompt = tlm.tok.encode("ROMEO:")
    greedy = SamplingConfig(max_new_tokens=20, temperature=0)
    want, engine = _engine_ids(tlm, prompt, greedy)
    assert len(want) == 20
    assert decode(tlm.model, prompt, 20, greedy, forward=engine.forward) == want  # the engine's own forward
    assert decode(tlm.model, prompt, 20, greedy) == want  # the module path, as training runs it
    drawn = SamplingConfig(max_new_tokens=20, temperature=0.9, top_k=40, seed=7)  # a row's draws: its seed's generator
    want, engine = _engine_ids(tlm, prompt, drawn)
    assert decode(tlm.model, prompt, 20, drawn, torch.Generator().manual_seed(7), forward=engine.forward) == want


def test_the_trainings_sample_is_what_decode_writes(tlm):
    import contextlib
    from types import SimpleNamespace

    from gradlm.model.infer import decode
    from gradlm.training.monitor import SAMPLING, write_sample

    prompt, rows = tlm.tok.encode("ROMEO:"), []
    t = SimpleNamespace(  # the parts of a Trainer that write_sample reads
        cfg=SimpleNamespace(sample_tokens=12, seed=3),
        dd=SimpleNamespace(main=True),
        block=64,
        sample_prompt_ids=lambda: prompt,
        model=tlm.model,
        device="cpu",
        autocast=contextlib.nullcontext,
        tok=tlm.tok,
        stamp=lambda: {"step": 1},
        samples=SimpleNamespace(write=lambda **row: rows.append(row)),
    )
    tlm.model.train()
    try:
        write_sample(t)
        assert tlm.model.training  # back in training mode
    finally:
        tlm.model.eval()
    text = tlm.tok.decode(
        decode(tlm.model, prompt, 12, SAMPLING, torch.Generator().manual_seed(3), vocab_size=tlm.tok.vocab_size)
    )
    assert rows == [{"step": 1, "prompt": "ROMEO:", "text": text}] and text
