"""The generation loop: sampling controls do what they say, cached/batched decoding equals the naive
loop, stop strings are honoured across token boundaries, logprobs match the model, errors are clear."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gradlm.cli import main
from gradlm.errors import ConfigError
from gradlm.generation.engine import Engine, Request, StopMatcher
from gradlm.generation.generate import LM, SamplingConfig, load
from gradlm.model import infer
from gradlm.model.infer import Forward, decode, fused_forward, inference_weights
from gradlm.model.transformer import Transformer
from gradlm.model.sampling import apply_penalties, candidates, next_token

from conftest import CYCLE, cycle_model, fit, generate_ids, sharp_model, tiny_config, write_run

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The sampler's filtered logits over the whole vocabulary (B, V): what next_token samples from."""
    values, order = candidates(logits, cfg)
    return values if order is None else torch.full_like(logits, float("-inf")).scatter(-1, order, values)


GREEDY = SamplingConfig(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def model(tok):
    return sharp_model(tok.vocab_size, n_kv_head=2)


@pytest.fixture(scope="module")
def lm(model, tok):
    return LM(model, tok)


@pytest.fixture(scope="module")
def tlm(tok, small_text):
    """A tiny model trained for a moment on Shakespeare: it writes words, spaces and newlines."""
    torch.manual_seed(0)
    m = Transformer(tiny_config(tok.vocab_size, n_kv_head=2))
    m.reset_parameters(seed=0)
    data = torch.tensor(tok.encode(small_text[:30000]))
    fit(m, data, 100)
    return LM(m.eval(), tok)


def naive_greedy(model: Transformer, prompt: list[int], n: int, block: int | None = None) -> list[int]:
    """Greedy decoding the slow way: the whole context through the module path every step, with
    the documented sliding window (when the context exceeds the window, keep its newest half)."""
    block = block or model.cfg.block_size
    ids, start, out = list(prompt), 0, []
    with torch.enable_grad():  # the module path (the cached fast path needs no_grad)
        for _ in range(n):
            if len(ids) - start > block:
                start = len(ids) - block // 2
            t = int(model(torch.tensor([ids[start:]]))[0, -1].argmax())
            out.append(t)
            ids.append(t)
    return out


# ---- sampling controls -----------------------------------------------------------------------------------


def test_top_k_1_is_greedy_and_top_k_keeps_exactly_k():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(next_token(logits, SamplingConfig(temperature=1.5, top_k=1), g), logits.argmax(-1))
    kept = filter_logits(logits, SamplingConfig(temperature=2.0, top_k=5))
    assert (kept.isfinite().sum(-1) == 5).all()
    top5 = logits.topk(5).indices
    assert kept.isfinite().gather(1, top5).all()
    # Among the kept tokens the distribution is softmax(logits / T), renormalised.
    probs = kept.softmax(-1).gather(1, top5)
    ref = (logits.gather(1, top5) / 2.0).softmax(-1)
    assert torch.allclose(probs, ref, atol=1e-6)


def test_temperature_scales_logits():
    logits = torch.randn(3, 20)
    got = filter_logits(logits, SamplingConfig(temperature=0.5)).softmax(-1)
    assert torch.allclose(got, (logits / 0.5).softmax(-1), atol=1e-6)


@pytest.mark.parametrize("p, n_kept", [(0.45, 1), (0.55, 2), (0.79, 2), (0.81, 3), (0.96, 4), (0.995, 5), (1.0, 5)])
def test_top_p_keeps_smallest_set_reaching_p(p, n_kept):
    probs = torch.tensor([0.15, 0.5, 0.04, 0.3, 0.01])  # sorted: .5 .3 .15 .04 .01; cumulative .5 .8 .95 .99 1
    out = filter_logits(probs.log()[None], SamplingConfig(temperature=1.0, top_p=p))[0]
    kept = set(out.isfinite().nonzero().flatten().tolist())
    order = probs.argsort(descending=True).tolist()
    assert kept == set(order[:n_kept])


def test_top_p_matches_brute_force_on_random_logits():
    torch.manual_seed(1)
    for _ in range(20):
        logits = torch.randn(1, 40) * 2
        p = float(torch.rand(()) * 0.9 + 0.05)
        kept = filter_logits(logits, SamplingConfig(temperature=1.0, top_p=p))[0].isfinite()
        probs, order = logits[0].softmax(-1).sort(descending=True)
        n = int((probs.cumsum(0) < p).sum()) + 1  # smallest prefix whose mass reaches p
        assert set(kept.nonzero().flatten().tolist()) == set(order[:n].tolist())


def test_min_p_threshold():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_logits(probs.log(), SamplingConfig(temperature=1.0, min_p=0.35))  # threshold 0.175
    assert out.isfinite().tolist() == [[True, True, False, False]]
    out = filter_logits(probs.log(), SamplingConfig(temperature=1.0, min_p=0.09))  # threshold 0.045: all stay
    assert out.isfinite().all()
    for extra in (dict(top_k=3), dict(top_p=0.99), dict(top_k=3, top_p=0.99)):  # the sorted code path
        out = filter_logits(probs.log(), SamplingConfig(temperature=1.0, min_p=0.35, **extra))
        assert out.isfinite().tolist() == [[True, True, False, False]], extra


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(temperature=0.7, top_k=4),
        SamplingConfig(temperature=1.0, top_p=0.7),
        SamplingConfig(temperature=1.3, min_p=0.2),
        SamplingConfig(temperature=1.0, top_k=6, top_p=0.8, min_p=0.1),
        SamplingConfig(temperature=0.9),
    ],
)
def test_samples_follow_the_filtered_distribution(cfg):
    torch.manual_seed(2)
    logits = torch.randn(1, 12) * 2
    want = filter_logits(logits, cfg).softmax(-1)[0]
    draws = next_token(logits.expand(20000, -1), cfg, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=12).float() / len(draws)
    assert (freq[want == 0] == 0).all()  # removed tokens are never drawn
    assert (freq - want).abs().max() < 0.015


def test_penalties_lower_repeated_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    seen = torch.tensor([[True, True, False, False]])
    counts = torch.tensor([[3.0, 0.0, 1.0, 0.0]])
    base = logits.softmax(-1)
    rep = apply_penalties(logits, seen, counts, SamplingConfig(repetition_penalty=2.0))
    assert rep.tolist() == [[1.0, -2.0, 0.5, 0.0]]  # positive divided, negative multiplied
    freq = apply_penalties(logits, seen, counts, SamplingConfig(frequency_penalty=0.5))
    assert torch.allclose(freq, logits - 0.5 * counts)
    pres = apply_penalties(logits, seen, counts, SamplingConfig(presence_penalty=0.5))
    assert torch.allclose(pres, logits - 0.5 * (counts > 0))
    for out, hit in ((rep, seen), (freq, counts > 0), (pres, counts > 0)):
        assert (out[hit] < logits[hit]).all() and torch.equal(out[~hit], logits[~hit])
        p = out.softmax(-1)
        assert p[hit].sum() < base[hit].sum()  # repeated tokens lose probability ...
        assert (p[~hit] > base[~hit]).all()  # ... to the others
    one = apply_penalties(logits, seen & (torch.arange(4) == 1), counts, SamplingConfig(repetition_penalty=1.5))
    assert one.softmax(-1)[0, 1] < base[0, 1]  # a single repeated token is less likely


def test_presence_penalty_in_the_loop_stops_repeats(tok):
    model = cycle_model(tok)  # built to repeat: greedy writes its cycle of CYCLE's tokens again and again
    prompt = tok.encode("H")
    plain = list(generate_ids(model, tok, prompt, SamplingConfig(temperature=0, max_new_tokens=25)))
    assert plain == (tok.encode(CYCLE)[1:] + tok.encode(CYCLE) * 5)[:25]  # it repeats itself when left alone ...
    penalised = list(
        generate_ids(model, tok, prompt, SamplingConfig(temperature=0, max_new_tokens=25, presence_penalty=1e4))
    )
    assert len(set(penalised)) == len(penalised)  # ... and never with a huge presence penalty


def test_invalid_settings_report_all_problems():
    with pytest.raises(ConfigError) as e:
        SamplingConfig(temperature=-1, top_p=0, min_p=2, stop=("",)).validate()
    msg = str(e.value)
    assert all(w in msg for w in ("temperature", "top-p", "min-p", "stop"))


# ---- the decoding loop -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(), dict(qk_norm=True, n_kv_head=2, tie_embeddings=True), dict(n_kv_head=1)])
def test_kv_cached_greedy_equals_naive_loop(kw, tok):
    m = sharp_model(tok.vocab_size, seed=3, **kw)
    prompt = tok.encode("ROMEO:\nWhat light")
    got = list(generate_ids(m, tok, prompt, SamplingConfig(temperature=0, max_new_tokens=20)))
    assert got == naive_greedy(m, prompt, 20)


def test_sliding_window_past_the_context(model, tok):
    prompt = tok.encode("To be, or not to be")
    n = 2 * model.cfg.block_size  # slides several times
    got = list(generate_ids(model, tok, prompt, SamplingConfig(temperature=0, max_new_tokens=n)))
    assert got == naive_greedy(model, prompt, n)


def test_batched_equals_one_at_a_time(model, tok):
    prompts = [tok.encode(p) for p in ("ROMEO:", "To be, or not to be, that is", "A", "KING RICHARD III:\nNow is the")]
    cfg = SamplingConfig(temperature=0, max_new_tokens=2 * model.cfg.block_size)  # includes sliding with padding
    rows = generate_ids(model, tok, prompts, cfg)
    for i, p in enumerate(prompts):
        assert rows[i] == generate_ids(model, tok, p, cfg), f"prompt {i}"


def test_rows_leave_the_batch_and_the_rest_are_unchanged(tlm):
    lm = tlm
    prompts = ["ROMEO:", "To be, or not to be, that is", "KING RICHARD III:\nNow is the", "What"]
    alone = [lm.complete(p, temperature=0, max_new_tokens=30)[0] for p in prompts]
    # A stop string taken from inside row 1's own output ends that row early; the others run on.
    stop = alone[1].text[8:11]
    batch = lm.complete(prompts, temperature=0, max_new_tokens=30, stop=[stop])
    for a, b in zip(alone, batch):
        cut = a.text.find(stop)
        assert b.text == (a.text if cut < 0 else a.text[:cut])
        assert b.finish_reason == ("length" if cut < 0 else "stop")
    assert batch[1].finish_reason == "stop" and len(batch[1].token_ids) < 30


def test_finished_rows_are_dropped_from_the_cache(model, tok):
    engine, pieces = Engine(model, tok), []
    cfg = SamplingConfig(temperature=0, max_new_tokens=6)
    handles = [engine.submit(Request(tok.encode(p), cfg), pieces.append) for p in ("ab", "cd", "ef")]
    sizes, rows = [], []
    for k in range(6):
        engine.step()
        sizes.append(len(pieces))
        rows.append(engine.stats()["running"])
        pieces.clear()
        if k == 1:
            handles[1].cancel()
    assert sizes == [3, 3, 2, 2, 2, 2]
    assert rows == [3, 3, 2, 2, 2, 0]


def test_same_seed_same_text(lm):
    cfg = SamplingConfig(temperature=1.0, top_k=40, max_new_tokens=30, seed=7)
    a, b = lm.generate("ROMEO:", cfg), lm.generate("ROMEO:", cfg)
    assert a == b
    assert lm.generate("ROMEO:", cfg, seed=8) != a
    assert lm.generate_batch(["ROMEO:", "JULIET:"], cfg) == lm.generate_batch(["ROMEO:", "JULIET:"], cfg)


def test_fused_inference_weights_follow_weight_changes(tok):
    m = sharp_model(tok.vocab_size, seed=5)
    lm = LM(m, tok)  # one engine, one Forward: its weight copies must notice the change
    before = lm.complete("ROMEO:", GREEDY)[0].token_ids
    with torch.no_grad():
        m.layers[0].self_attn.k_proj.weight.mul_(-1.0)  # in place: the cached concatenation must notice
        m.layers[1].mlp.up_proj.weight.add_(0.5)
    after = lm.complete("ROMEO:", GREEDY)[0].token_ids
    assert after == naive_greedy(m, tok.encode("ROMEO:"), GREEDY.max_new_tokens)
    assert after != before


def test_cached_fast_path_matches_module_path_with_padding(tok):
    m = sharp_model(tok.vocab_size, seed=4, qk_norm=True, n_kv_head=2)
    x = torch.randint(0, tok.vocab_size, (3, 9))
    pad = [0, 3, 5]
    outs = []
    for fast in (True, False):  # the engine's Forward in inference mode: fused; Transformer.forward: the module path
        with torch.inference_mode():
            cache = m.new_cache(3, 16, pad=pad)
            step = (
                (lambda idx: fused_forward(m, inference_weights(m), idx, cache, False))
                if fast
                else (lambda idx: m(idx, cache=cache))
            )
            outs.append(
                torch.cat([step(x), step(torch.tensor([[1], [2], [3]])), step(torch.tensor([[4], [5], [6]]))], 1)
            )
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    with torch.inference_mode():  # Forward takes the fused path here, and refuses to overrun the cache
        cache = m.new_cache(3, 16, pad=pad)
        assert torch.allclose(Forward(m)(x, cache), outs[1][:, :9], atol=1e-5)
        with pytest.raises(ValueError, match="exceeds"):
            Forward(m)(torch.zeros(3, 8, dtype=torch.long), cache)


class _Reads(TorchDispatchMode):
    """The addresses of the tensors a run reads that it did not make itself (what a CUDA graph reads by address)."""

    def __init__(self):
        super().__init__()
        self.made, self.read = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.made:
                self.read.add(t.untyped_storage().data_ptr())
        out = func(*args, **(kwargs or {}))
        self.made.update(t.untyped_storage().data_ptr() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


@pytest.fixture
def graphs_on_the_cpu(monkeypatch) -> list:
    """GraphStep records on the CPU here: a recording runs the step once, a replay runs it again on the same tensors
    (what a CUDA graph replays: the recorded step, reading and writing the same addresses; each replay checks that it
    reads no tensor the recording did not). One item per recording."""
    recorded = []

    def record(run):
        with _Reads() as first:
            out = run()
        recorded.append(out.shape[0])

        def replay():
            with _Reads() as again:
                out.copy_(run())
            assert again.read - {out.untyped_storage().data_ptr()} <= first.read, "a replay read another tensor"

        return replay, out

    monkeypatch.setattr(infer.GraphStep, "record", staticmethod(record))
    monkeypatch.setattr(infer.GraphStep, "devices", ("cpu",))
    return recorded


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)], ids=["float32", "bfloat16"])
def test_the_graph_step_gives_the_eager_logits_and_keys_for_any_rows_and_caches(
    tok, graphs_on_the_cpu, monkeypatch, dtype, tol
):
    """The step a CUDA graph records (fused_forward with the position as a tensor, attention over the whole buffer,
    masked) against the fused path, with left padding, grouped-query attention and QK-norm; one recording per batch
    size; two caches taking turns in one batch size's buffer, and a cache stepped outside the graph in between, each
    still get their own logits."""
    monkeypatch.setattr(infer, "GRAPH_SHORTEST", 8)  # graphs over 8, 16 and 32 keys (the window)
    m = sharp_model(tok.vocab_size, seed=4, qk_norm=True, n_kv_head=2).to(dtype)
    w = inference_weights(m)
    step = infer.GraphStep(m, w)
    with torch.inference_mode():
        for prompts in ([[1, 2, 3]], [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]):
            B = len(prompts)
            P = max(map(len, prompts))
            pad = [P - len(p) for p in prompts]
            ids = torch.tensor([[0] * n + p for n, p in zip(pad, prompts)])
            ours, theirs, other, other_ref = (m.new_cache(B, 32, pad=pad if any(pad) else None) for _ in range(4))
            for c in (ours, theirs, other, other_ref):
                fused_forward(m, w, ids, c, True)
            nxt = torch.tensor([[7 + b] for b in range(B)])
            while ours.pos < 30:
                assert step.fits(nxt, ours)
                want, got = fused_forward(m, w, nxt, theirs, False), step(nxt, ours)
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
                torch.testing.assert_close(
                    ours.kv[..., : ours.pos, :], theirs.kv[..., : theirs.pos, :], rtol=tol, atol=tol
                )
                assert ours.pos == theirs.pos
                if ours.pos % 3 == 0:  # another cache takes the same buffer, then this one comes back
                    o = torch.tensor([[3 + b] for b in range(B)])
                    want_o = fused_forward(m, w, o, other_ref, False)
                    torch.testing.assert_close(step(o, other), want_o, rtol=tol, atol=tol)
                if ours.pos == 12:  # a step taken outside the graph
                    fused_forward(m, w, nxt, ours, False)
                    fused_forward(m, w, nxt, theirs, False)
                nxt = want[:, -1].argmax(-1, keepdim=True)
    # one recording per batch size and length of keys: 1 row, and 3 rows in the 4-row graphs
    assert sorted(step.graphs) == [(1, 8), (1, 16), (1, 32), (4, 8), (4, 16), (4, 32)]
    assert len(graphs_on_the_cpu) == 6


def test_the_engine_gives_the_same_tokens_with_its_step_in_graphs(tok, graphs_on_the_cpu):
    """--compile on on CUDA: rows joining and leaving, a row sliding past the window, sampled rows, a conversation
    continuing its cache, all through the recorded step, as without it."""
    from gradlm.runtime import Runtime

    model = sharp_model(tok.vocab_size, n_kv_head=2, qk_norm=True)
    engines = {
        "eager": Engine(model, tok, runtime=Runtime("cpu", "float32")),
        "graphs": Engine(model, tok, runtime=Runtime("cpu", "float32", decode_step="graphs")),
    }
    greedy = SamplingConfig(temperature=0, max_new_tokens=70)
    requests = [
        Request(tok.encode("ROMEO:"), greedy, slide=True),  # 70 new tokens in a window of 32: the row slides
        Request(tok.encode("JULIET: what"), SamplingConfig(temperature=0, max_new_tokens=5)),  # leaves early
        Request(tok.encode("NURSE:"), SamplingConfig(temperature=0.8, seed=3, max_new_tokens=20), n=2),
    ]
    said = {}
    for name, engine in engines.items():
        tokens = [[p.token.id for p in pieces] for pieces in engine.run(requests)]
        cache, ids = model.new_cache(1, 32), tok.encode("ROMEO:")
        for more in ("JULIET:", "NURSE: good"):  # a chat: each turn continues the last one's cache
            (pieces,) = engine.run([Request(ids, SamplingConfig(temperature=0, max_new_tokens=6), cache=cache)])
            tokens.append([p.token.id for p in pieces])
            ids = ids + tokens[-1] + tok.encode(more)
        said[name] = tokens, cache.kv[..., : cache.pos, :].clone()
    assert said["graphs"][0] == said["eager"][0]
    torch.testing.assert_close(said["graphs"][1], said["eager"][1], rtol=1e-4, atol=1e-4)
    assert isinstance(engines["graphs"].forward.step, infer.GraphStep) and engines["eager"].forward.step is None
    assert sorted(set(graphs_on_the_cpu)) == [1, 4]  # 4 rows, then 3 (in the 4-row graph), then 1


def _refused(run):
    raise RuntimeError("operation not permitted when stream is capturing\nmore")


def _empty(run):  # a graph recorded on another device's stream: its replays compute nothing
    out = run()
    return (lambda: None), out


@pytest.mark.parametrize(
    "record, why",
    [
        (_refused, "RuntimeError: operation not permitted when stream is capturing"),
        (_empty, "RuntimeError: the recorded graph did not compute the step"),
    ],
    ids=["refused", "empty"],
)
def test_a_graph_that_fails_to_record_decodes_eagerly_after_one_warning(
    tok, graphs_on_the_cpu, monkeypatch, capsys, record, why
):
    monkeypatch.setattr(infer.GraphStep, "record", staticmethod(record))
    from gradlm.runtime import Runtime

    model = sharp_model(tok.vocab_size)
    request = Request(tok.encode("ROMEO:"), SamplingConfig(temperature=0, max_new_tokens=12))
    graphs = Engine(model, tok, runtime=Runtime("cpu", "float32", decode_step="graphs"))
    (pieces,) = graphs.run([request])
    assert [p.token.id for p in pieces] == [p.token.id for p in Engine(model, tok).run([request])[0]]
    assert capsys.readouterr().err.splitlines() == [
        f"warning: recording the decoding step as a CUDA graph failed ({why}); decoding without it "
        "(--compile off skips the attempt)"
    ]
    assert not graphs.forward.step.fits(torch.tensor([[1]]), model.new_cache(1, 8))  # not tried again


def test_a_cache_rewritten_outside_the_graphs_is_copied_in_again_and_a_moved_model_decodes_eagerly(
    tok, graphs_on_the_cpu, monkeypatch
):
    """What a chat does when it drops old turns: the cache's position set back and new ids run through the fused path
    over the same positions; the next graph step, at a position the buffer held, reads the new keys. A model no
    longer on a device the graphs record on (here: the CPU no longer one) decodes eagerly."""
    m = sharp_model(tok.vocab_size, seed=2)
    forward, w = Forward(m, step="graphs"), inference_weights(m)
    with torch.inference_mode():
        ours, theirs = m.new_cache(1, 32), m.new_cache(1, 32)
        for c in (ours, theirs):
            fused_forward(m, w, torch.tensor([[1, 2, 3, 4]]), c, True)
        for t in (5, 6, 7):
            torch.testing.assert_close(
                forward(torch.tensor([[t]]), ours), fused_forward(m, w, torch.tensor([[t]]), theirs, False)
            )
        assert isinstance(forward.step, infer.GraphStep)
        for c in (ours, theirs):
            c.pos -= 3
        forward(torch.tensor([[9, 10, 11]]), ours)  # (more than one token: the fused path)
        fused_forward(m, w, torch.tensor([[9, 10, 11]]), theirs, False)
        torch.testing.assert_close(
            forward(torch.tensor([[12]]), ours), fused_forward(m, w, torch.tensor([[12]]), theirs, False)
        )
        with torch.no_grad():  # new weights (training, load_state_dict): graphs recorded with the old ones are dropped
            m.layers[0].mlp.up_proj.weight.mul_(-1)
        forward.check()
        w = inference_weights(m)
        torch.testing.assert_close(
            forward(torch.tensor([[13]]), ours), fused_forward(m, w, torch.tensor([[13]]), theirs, False)
        )
    monkeypatch.setattr(infer.GraphStep, "devices", ("cuda",))
    with torch.no_grad():
        m.lm_head.weight.mul_(2)  # (new weights: check() hands them to the step, which refuses this device)
    forward.check()
    assert forward.step is None and forward.step_mode == "off"
    cfg = SamplingConfig(temperature=0, max_new_tokens=8)
    assert decode(m, [1, 2, 3], 8, cfg, forward=forward) == decode(m, [1, 2, 3], 8, cfg)


@pytest.mark.numerics
@pytest.mark.parametrize("weight_only", [False, True], ids=["dynamic", "weight-only"])
def test_int8_products_are_the_float32_products_to_within_the_rounding_of_int8(weight_only, monkeypatch):
    """--dtype int8: each matrix as int8 with a scale per output column; few rows multiply through the weight-only
    kernel (bf16 activations) where ATen has AVX512, the rest by dynamic quantization. Both stay near a @ w."""
    from gradlm.model import infer

    monkeypatch.setattr(infer.Int8, "weight_only", weight_only)
    g = torch.Generator().manual_seed(0)
    w, a = torch.randn(96, 160, generator=g) / 10, torch.randn(3, 96, generator=g)
    m = infer.Int8(w)
    assert (m.q is not None) == weight_only
    got, want = m.times(a), a @ w
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = float((got - want).norm() / want.norm())
    assert 1e-5 < err < 0.02, err  # int8 rounding: not exact, and not far
    if weight_only:  # more rows than WEIGHT_ONLY_ROWS take dynamic quantization: another rounding, as close
        many = torch.randn(infer.WEIGHT_ONLY_ROWS + 1, 96, generator=g)
        assert float((m.times(many) - many @ w).norm() / (many @ w).norm()) < 0.02


@pytest.mark.numerics
def test_int8_decoding_keeps_the_float32_models_predictions(tok):
    """The int8 fused path (both kernels: the one-row steps and the 9-token prompt) picks float32's likeliest token
    wherever float32 prefers it clearly (by more than int8's rounding moves a logit)."""
    m = sharp_model(tok.vocab_size, seed=4, scale=10.0)
    x = torch.randint(0, tok.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    logits = []
    for int8 in (False, True):
        with torch.inference_mode():
            cache, forward = m.new_cache(1, 16), Forward(m, int8=int8)
            steps = [forward(x, cache)] + [forward(torch.tensor([[t]]), cache) for t in (3, 1, 4, 1, 5)]
            logits.append(torch.cat(steps, 1)[0].float())
    f32, q8 = logits
    top = f32.topk(2, -1).values
    clear = top[:, 0] - top[:, 1] > 0.25
    assert clear.sum() >= 4 and torch.equal(q8.argmax(-1)[clear], f32.argmax(-1)[clear])
    assert 1e-4 < float((q8 - f32).norm() / f32.norm()) < 0.08


# ---- text: stop strings, logprobs, prompts ---------------------------------------------------------------


def test_stop_matcher_holds_back_possible_starts():
    m = StopMatcher(["\n\n", "THE END"])
    assert m.push("Hello") == ("Hello", False)
    assert m.push(" world\n") == (" world", False)  # "\n" might start "\n\n": held
    assert m.push("x") == ("\nx", False)  # it did not
    assert m.push(" THE E") == (" ", False)
    assert m.push("ND and more") == ("", True)
    m = StopMatcher(["abc", "bd"])
    assert m.push("xab") == ("x", False)
    assert m.push("d") == ("a", True)  # "bd" completes first; "a" was not part of it
    m = StopMatcher(["zz"])
    assert m.push("az") == ("a", False)
    assert m.flush() == "z"  # generation ended for another reason: the held text is shown


def test_stop_string_split_across_tokens_is_honoured_and_not_emitted(tlm, tok):
    full = tlm.complete("ROMEO:", temperature=0, max_new_tokens=40)[0]
    pieces = [tok.decode([i]) for i in full.token_ids]
    assert "".join(pieces) == full.text
    ends = list(itertools.accumulate(len(p) for p in pieces))
    # A stop string made of the last character of one token and the start of the next, found first there.
    for k in range(1, len(pieces) - 1):
        stop = pieces[k][-1:] + pieces[k + 1][:2]
        if pieces[k] and pieces[k + 1] and full.text.find(stop) == ends[k] - 1:
            break
    else:
        pytest.fail(f"no token boundary to test in {full.text!r}")
    cut = ends[k] - 1
    streamed = list(tlm.stream("ROMEO:", temperature=0, max_new_tokens=40, stop=[stop]))
    assert "".join(streamed) == full.text[:cut]  # nothing of the stop string, nothing taken back
    c = tlm.complete("ROMEO:", temperature=0, max_new_tokens=40, stop=[stop])[0]
    assert c.text == full.text[:cut] and c.finish_reason == "stop"
    assert c.token_ids == full.token_ids[: k + 2]  # generation ended at the token that completed it


def test_logprobs_match_the_models_softmax(lm, model, tok):
    prompt = tok.encode("ROMEO:")
    c = lm.complete("ROMEO:", temperature=0.9, seed=3, max_new_tokens=10, logprobs=4)[0]
    ids = list(prompt)
    with torch.enable_grad():
        for t in c.logprobs:
            ref = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), -1)
            ref = ref.detach()
            assert math.isclose(t.logprob, float(ref[t.id]), abs_tol=1e-4)
            best = ref.topk(4)
            assert [i for i, _, _ in t.top] == best.indices.tolist()
            assert torch.allclose(torch.tensor([lp for _, _, lp in t.top]), best.values, atol=1e-4)
            ids.append(t.id)
    assert [t.id for t in c.logprobs] == c.token_ids


def test_prompt_longer_than_context(lm, tok):
    long_prompt = "to be or not " * 200
    with pytest.raises(ConfigError, match="context window"):
        lm.generate(long_prompt)
    text = lm.generate(long_prompt, truncate="left", temperature=0, max_new_tokens=5)
    ids = tok.encode(long_prompt)[-lm.context_window :]
    assert text == tok.decode(
        list(generate_ids(lm.model, tok, ids, SamplingConfig(temperature=0, max_new_tokens=5), {tok.eot_id}))
    )


def test_empty_prompt_starts_a_document_and_unknown_settings_fail(lm):
    assert isinstance(lm.generate("", max_new_tokens=5, seed=0), str)
    with pytest.raises(ConfigError, match="unknown sampling setting"):
        lm.generate("x", temprature=0.5)


# ---- command line ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model, tok):
    return write_run(tmp_path_factory.mktemp("gen") / "run", model, tok)


def test_load_and_cli_generate_batch(run_dir, lm, tmp_path, capsys):
    assert load(run_dir).generate("ROMEO:", temperature=0, max_new_tokens=8) == lm.generate(
        "ROMEO:", temperature=0, max_new_tokens=8
    )
    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps("ROMEO:") + "\n" + json.dumps({"prompt": "To be\nor"}) + "\n")
    assert (
        main(
            [
                "generate",
                str(run_dir),
                "KING",
                "--prompts",
                str(f),
                "--temperature",
                "0",
                "--max-new-tokens",
                "6",
                "--batch",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "--- 1/3: 'KING' ---" in out and "--- 3/3: 'To be\\nor' ---" in out
    assert lm.generate("To be\nor", temperature=0, max_new_tokens=6) in out
    assert (
        main(["generate", str(run_dir), "ROMEO:", "--temperature", "0", "--max-new-tokens", "3", "--logprobs", "2"])
        == 0
    )
    out = capsys.readouterr().out
    assert "%" in out and "finished by length" in out


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.mark.parametrize(
    "args, message",
    [
        (["RUN", "to be or not " * 200], "context window"),
        (["RUN", "hi", "--logprobs", "-1"], "logprobs"),
        (["RUN", "hi", "--top-p", "0"], "top-p"),
        (["RUN", "--prompts", "missing.txt"], "no prompts file"),
        (["RUN", "hi", "--truncate", "right"], "invalid choice"),
    ],
)
def test_cli_errors_exit_2_with_one_line(run_dir, capsys, args, message):
    code = run_cli(["generate"] + [str(run_dir) if a == "RUN" else a for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
