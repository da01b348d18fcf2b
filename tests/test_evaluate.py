"""Evaluation: sliding-window loss equals a direct computation, bits per byte of a uniform byte model is
8, typos are seeded and respect their rate, multiple choice finds the answer a model was taught."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradlm import files as ckpt
from gradlm.cli import main
from gradlm.errors import ConfigError, DataError
from gradlm.evaluation.evaluate import (
    ChoiceItem,
    EvalConfig,
    evaluate_text,
    format_report,
    inject_typos,
    load_choices,
    run_eval,
    score_choices,
    window_plan,
)
from gradlm.model.transformer import Transformer
from gradlm.text.tokenizer import Tokenizer, _build_hf, byte_to_char

from conftest import fit, sharp_model, tiny_config

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice


def random_model(vocab: int, seed: int = 0, **kw) -> Transformer:
    return sharp_model(vocab, seed, scale=3.0, **kw)  # a model with opinions: losses far from uniform


def nll_with_context(model: Transformer, seq: list[int], t: int, begin: int) -> float:
    """-log p(seq[t] | seq[begin:t]), one full forward."""
    with torch.no_grad():
        logits = model(torch.tensor([seq[begin:t]]))[0, -1]
    return -float(torch.log_softmax(logits.double(), -1)[seq[t]])


# ---- sliding windows ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), window=st.integers(1, 64), data=st.data())
def test_window_plan_scores_each_token_once_with_enough_context(n, window, data):
    stride = data.draw(st.integers(1, window))
    plan = window_plan(n, window, stride)
    scored = [t for _, e, f in plan for t in range(f, e + 1)]
    assert scored == list(range(1, n + 1))  # every target once, in order
    for b, e, f in plan:
        assert e - b == min(window, n) and b >= 0  # full windows (one short one for a short text)
        assert f - b >= min(f, window - stride + 1)  # each token sees at least window - stride + 1 ... tokens
    assert len(plan) == 1 + max(0, math.ceil((n - window) / stride))


def test_loss_equals_direct_computation(tok):
    m = random_model(tok.vocab_size)
    text = "ROMEO:\nBut soft, what light"
    seq = [tok.eot_id] + tok.encode(text)
    assert len(seq) <= m.cfg.block_size + 1
    with torch.no_grad():
        direct = float(m(torch.tensor([seq[:-1]]), torch.tensor([seq[1:]])))
    got = evaluate_text(m, tok, text)
    assert got.tokens == len(seq) - 1 and got.windows == 1
    assert math.isclose(got.loss, direct, rel_tol=1e-5)
    assert math.isclose(got.perplexity, math.exp(direct), rel_tol=1e-5)


def test_sliding_windows_equal_per_token_computation(tok, small_text):
    m = random_model(tok.vocab_size, seed=1)
    W = m.cfg.block_size
    text = small_text[:250]
    seq = [tok.eot_id] + tok.encode(text)
    n = len(seq) - 1
    assert n > 2 * W
    memo: dict[tuple[int, int], float] = {}
    for stride in (1, 5, W):
        # Independently: token t (t <= W) sees everything before it; a later token belongs to the window
        # ending at the first of W, W + stride, W + 2 stride, ... (or the text's end) at or after t.
        total = 0.0
        for t in range(1, n + 1):
            begin = 0 if t <= W else min(W + math.ceil((t - W) / stride) * stride, n) - W
            if (t, begin) not in memo:
                memo[t, begin] = nll_with_context(m, seq, t, begin)
            total += memo[t, begin]
        got = evaluate_text(m, tok, text, stride=stride, batch=3)
        assert got.tokens == n
        assert math.isclose(got.loss, total / n, rel_tol=1e-5), stride


def test_bits_per_byte_of_a_uniform_byte_model_is_8():
    b2c = byte_to_char()
    byte_tok = Tokenizer(_build_hf({b2c[b]: b for b in range(256)}, [], []))  # 256 ids, no specials
    m = Transformer(tiny_config(256))
    with torch.no_grad():
        m.lm_head.weight.zero_()  # every byte equally likely
    text = "héllo wörld 🙂 naïve café\n" * 20
    r = evaluate_text(m, byte_tok, text, stride=7)
    assert math.isclose(r.bits_per_byte, 8.0, rel_tol=1e-7)  # float32 logits
    assert math.isclose(r.perplexity, 256.0, rel_tol=1e-6)
    # No <|endoftext|> to start from: the first byte is not scored.
    assert r.bytes == len(text.encode()) - 1 and r.chars == len(text) - 1
    assert math.isclose(r.bits_per_char, 8.0 * r.bytes / r.chars, rel_tol=1e-7)


def test_uniform_model_bookkeeping_with_documents(tok):
    m = Transformer(tiny_config(tok.vocab_size))
    with torch.no_grad():
        m.lm_head.weight.zero_()
    docs = ["To be, or not to be: that is the question.", "Whether 'tis nobler in the mind to suffer"]
    n_text = sum(len(tok.encode(d)) for d in docs)
    r = evaluate_text(m, tok, docs)
    assert r.tokens == n_text + 1  # the <|endoftext|> between the documents is predicted too ...
    nbytes = sum(len(d.encode()) for d in docs)
    assert r.bytes == nbytes and r.chars == sum(map(len, docs))  # ... but covers no bytes
    assert math.isclose(r.bits_per_byte, n_text * math.log2(tok.vocab_size) / nbytes, rel_tol=1e-7)


def test_bad_stride_and_short_text(tok):
    m = random_model(tok.vocab_size)
    with pytest.raises(ConfigError, match="stride"):
        evaluate_text(m, tok, "hello there", stride=m.cfg.block_size + 1)
    with pytest.raises(DataError, match="too short"):
        evaluate_text(m, tok, "")


# ---- typos ----------------------------------------------------------------------------------------------


def osa_distance(a: str, b: str) -> int:
    """Edit distance with adjacent transpositions (optimal string alignment)."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def test_typos_are_seeded_and_respect_the_rate(small_text):
    text = small_text[:20000]
    rate = 0.05
    a, b, c = inject_typos(text, rate, seed=1), inject_typos(text, rate, seed=1), inject_typos(text, rate, seed=2)
    assert a == b and a.text != c.text
    letters = sum(ch.isalpha() for ch in text)
    assert a.letters == letters
    assert abs(a.edits / letters - rate) < 4 * math.sqrt(rate * (1 - rate) / letters) + rate**2
    # Only letters inside words change: punctuation, spaces and digits stay, and so does every word.
    assert [ch for ch in a.text if not ch.isalpha()] == [ch for ch in text if not ch.isalpha()]
    words, noisy = re.split(r"[^A-Za-z]+", text), re.split(r"[^A-Za-z]+", a.text)
    assert len(words) == len(noisy)
    dist = sum(osa_distance(w, v) for w, v in zip(words, noisy) if w != v)
    assert 0.9 * a.edits <= dist <= a.edits  # each typo is one edit (two in one word may overlap)
    assert inject_typos(text, 0.0, seed=3).text == text
    every = inject_typos("abcdefgh", 1.0, seed=0)
    assert every.edits >= 4 and every.text != "abcdefgh"
    with pytest.raises(ConfigError, match="typo rate"):
        inject_typos(text, 1.5)


# ---- multiple choice ------------------------------------------------------------------------------------

FACTS = ["the sky is blue.", "the grass is green.", "the sun is hot.", "the snow is cold."]
ITEMS = [
    ChoiceItem("the sky is", [" green", " blue", " hot"], 1),
    ChoiceItem("the grass is", [" cold", " hot", " green"], 2),
    ChoiceItem("the sun is ", ["hot", "blue", "cold"], 0),  # trailing space: moved onto the answers
    ChoiceItem("so the snow is", [" hot", " cold", " green"], 1),
]


def choice_logprobs(model: Transformer, tok: Tokenizer, item: ChoiceItem) -> list[float]:
    """log p(choice | context) of each choice, token by token with full forwards (not score_choices): the
    context after <|endoftext|>, a trailing space moved onto the choices."""
    context = item.context.rstrip(" ")
    ctx = [tok.eot_id] + tok.encode(context)
    out = []
    for choice in item.choices:
        seq = ctx + tok.encode(item.context[len(context) :] + choice)
        out.append(-sum(nll_with_context(model, seq, t, 0) for t in range(len(ctx), len(seq))))
    return out


def knows_the_answers(model: Transformer, tok: Tokenizer) -> bool:
    """Whether the planted answer leads every other choice by a nat (a factor e), in total and per byte: a lead
    that float noise cannot undo, so scoring must pick it."""
    for item in ITEMS:
        lp = choice_logprobs(model, tok, item)
        per_byte = [
            v / len((item.context[len(item.context.rstrip(" ")) :] + c).encode()) for v, c in zip(lp, item.choices)
        ]
        others = [i for i in range(len(lp)) if i != item.answer]
        if (
            max(lp[i] for i in others) > lp[item.answer] - 1
            or max(per_byte[i] for i in others) > per_byte[item.answer] - 0.2
        ):
            return False
    return True


@pytest.fixture(scope="module")
def taught():
    """A tiny byte-level model trained on a few facts until it knows the answers, and its tokenizer."""
    import random

    rng = random.Random(0)
    text = " ".join(rng.choice(FACTS) for _ in range(600))
    tok = Tokenizer.train([text], 256)
    torch.manual_seed(0)
    m = Transformer(tiny_config(tok.vocab_size))
    m.reset_parameters(seed=0)
    data = torch.tensor(tok.encode(text))
    fit(m, data, 80, until=lambda m: knows_the_answers(m, tok))
    return m.eval(), tok, text


def test_multiple_choice_picks_the_planted_answer(taught):
    m, tok, _ = taught
    s = score_choices(m, tok, ITEMS, batch=4)
    assert s.items == 4 and s.correct == 4 and s.correct_norm == 4
    assert s.accuracy == 1.0 and s.accuracy_norm == 1.0
    # The scores are the model's log-likelihoods of each choice given the context (checked directly).
    ctx = [tok.eot_id] + tok.encode("the sky is")
    cont = tok.encode(" blue")
    seq = ctx + cont
    direct = -sum(nll_with_context(m, seq, t, 0) for t in range(len(ctx), len(seq)))
    assert math.isclose(s.predictions[0]["logprobs"][1], direct, abs_tol=1e-5)


def test_untrained_model_is_not_always_right():
    m = random_model(259, seed=2)
    byte_tok = Tokenizer.train(["abc"], 256)
    s = score_choices(m, byte_tok, ITEMS * 3, batch=5)
    assert s.correct < len(ITEMS) * 3  # the test above can fail


def test_choices_file_errors(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "answer": "c"}) + "\n\n")
    assert load_choices(f) == [ChoiceItem("a", ["b", "c"], 1)]
    for bad, message in [
        ({"context": "a", "choices": ["b"], "answer": 0}, "at least two"),
        ({"context": "a", "choices": ["b", "c"], "answer": 2}, "answer"),
        ({"choices": ["b", "c"], "answer": 0}, "context"),
    ]:
        f.write_text(json.dumps({"context": "x", "choices": ["y", "z"], "answer": 0}) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=f"line 2.*{message}"):
            load_choices(f)


# ---- the command ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, taught):
    m, tok, text = taught
    d = tmp_path_factory.mktemp("eval")
    run = d / "run"
    run.mkdir()
    ckpt.atomic_write_json(run / "config.json", {"model": m.cfg.to_dict()})
    tok.save(run / "tokenizer.json")
    ckpt.save_weights(run / "model.safetensors", m.state_dict())
    (d / "facts.txt").write_text(text[:3000])
    (d / "items.jsonl").write_text(
        "".join(json.dumps({"context": i.context, "choices": i.choices, "answer": i.answer}) + "\n" for i in ITEMS)
    )
    return run


def test_run_eval_reports_clean_noisy_and_choices(run_dir, taught):
    m, tok, text = taught
    cfg = EvalConfig(
        data=str(run_dir.parent / "facts.txt"),
        typos=0.1,
        seed=0,
        choices=str(run_dir.parent / "items.jsonl"),
        progress=False,
    )
    r = run_eval(m, tok, cfg)
    assert r["clean"] == evaluate_text(m, tok, text[:3000]).to_dict()
    assert r["typos"]["penalty_bits_per_byte"] > 0.1  # typos in text it knows by heart hurt
    assert r["typos"]["noisy"] == evaluate_text(m, tok, inject_typos(text[:3000], 0.1, 0).text).to_dict()
    assert r["choices"]["accuracy"] == 1.0
    out = format_report(r)
    assert "bits per byte" in out and "penalty +" in out and "accuracy 1.000" in out


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


def test_cli_eval_json(run_dir, capsys):
    d = run_dir.parent
    assert (
        run_cli(
            [
                "eval",
                str(run_dir),
                "--data",
                str(d / "facts.txt"),
                "--typos",
                "0.05",
                "--choices",
                str(d / "items.jsonl"),
                "--json",
                "--stride",
                "8",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["clean"]["stride"] == 8 and r["typos"]["rate"] == 0.05 and r["choices"]["items"] == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "FACTS", "--typos", "1.5"], "--typos"),
        (["--data", "FACTS", "--typos", "-0.1"], "--typos"),
        (["--data", "FACTS", "--typos", "lots"], "invalid float"),
        (["--typos", "0.1"], "nothing to evaluate"),
        (["--data", "FACTS", "--stride", "1000"], "--stride"),
        (["--data", "missing.txt"], "no such file"),
        (["--choices", "missing.jsonl"], "no choices file"),
    ],
)
def test_cli_eval_errors_exit_2_with_one_line(run_dir, capsys, args, message):
    argv = ["eval", str(run_dir)] + [str(run_dir.parent / "facts.txt") if a == "FACTS" else a for a in args]
    code = run_cli(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_plain_progress_lines_end_at_100_percent(monkeypatch, capsys):
    """Off a terminal the progress is a line every 10 s; the last one says 100% (it used to stop at 97%)."""
    from gradlm.evaluation import evaluate

    clock = iter(range(0, 10_000, 4))  # every call to time.time() is 4 s later
    monkeypatch.setattr(evaluate.time, "time", lambda: next(clock))
    bar = evaluate._Progress(33, True, "window")
    for _ in range(33):
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) > 2 and lines[-1].startswith("eval: 100% (33/33 windows")
    assert all(not ln.startswith("eval: 100%") for ln in lines[:-1])
