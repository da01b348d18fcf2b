"""Constrained decoding (gradlm/generation/constrain.py in the engine's sampler): every constrained output is valid over
many seeds, temperatures and sampling controls, batched together; rows without a constraint write what they
would alone; a constraint that cannot compile is one clear error in the API, the CLI and the server; the
official openai client's response_format round trip; QA with --answers choices."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from gradlm.cli import main
from gradlm.generation.constrain import make_constraint
from gradlm.generation.engine import Engine, Request
from gradlm.errors import ConfigError, ConstraintError
from gradlm.generation.generate import LM
from gradlm.model.sampling import SamplingConfig
from gradlm.serving.serve import create_app

from conftest import sharp_model, write_run
from test_serve import live

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice

REGEX = r"[0-9]{1,3} (mg|ml)"
CHOICES = ["aspirin", "ibuprofen", "beta blocker", "ACE inhibitor"]
SCHEMA = {
    "type": "object",
    "properties": {
        "drug": {"type": "string", "maxLength": 10},
        "dose": {"type": "integer", "minimum": 1, "maximum": 999},
        "daily": {"type": "boolean"},
    },
    "required": ["drug", "dose", "daily"],
    "additionalProperties": False,
}
GRAMMAR = 'start: "take " NUM " " UNIT\nNUM: /[1-9][0-9]?/\nUNIT: "mg" | "ml"'


def fits_schema(text: str) -> bool:
    obj = json.loads(text)
    return (
        set(obj) == {"drug", "dose", "daily"}
        and isinstance(obj["drug"], str)
        and len(obj["drug"]) <= 10
        and type(obj["dose"]) is int
        and 1 <= obj["dose"] <= 999
        and type(obj["daily"]) is bool
    )


VALID = {
    "regex": (REGEX, lambda t: re.fullmatch(REGEX, t) is not None),
    "choices": (CHOICES, lambda t: t in CHOICES),
    "json_schema": (SCHEMA, fits_schema),
    "grammar": (GRAMMAR, lambda t: re.fullmatch(r"take [1-9][0-9]? (mg|ml)", t) is not None),
}
SETTINGS = [
    dict(temperature=0),
    dict(temperature=0.7),
    dict(temperature=1.5),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.0, top_p=0.9, min_p=0.05),
    dict(temperature=1.2, repetition_penalty=1.3, frequency_penalty=0.5),  # rows with penalties are picked one by one
]


@pytest.fixture(scope="module")
def model(tok):
    return sharp_model(len(tok), block_size=256)


@pytest.fixture(scope="module")
def lm(model, tok):
    return LM(model, tok)


def texts(runs) -> list[tuple[str, str]]:
    return [("".join(p.text for p in pieces), pieces[-1].finish) for pieces in runs]


@pytest.mark.parametrize("kind", list(VALID))
def test_every_constrained_output_is_valid_over_seeds_temperatures_and_controls(model, tok, kind):
    value, valid = VALID[kind]
    constraint = make_constraint(**{kind: value})
    prompts = [tok.encode("ROMEO:"), tok.encode("What is the dose?")]
    requests = [
        Request(
            prompts[seed % 2],
            SamplingConfig(max_new_tokens=200, seed=seed, **s),
            1,
            frozenset([tok.eot_id]),
            constraint=constraint,
        )
        for seed in range(5)
        for s in SETTINGS
    ]
    out = texts(Engine(model, tok, max_batch=len(requests)).run(requests))  # all in one batch
    bad = [(t, f) for t, f in out if f != "stop" or not valid(t)]
    assert not bad, bad
    if kind != "choices":
        assert len({t for t, _ in out}) > 3  # sampling still varies inside the constraint


def test_continuous_batching_and_n_samples_keep_every_row_valid(model, tok):
    """A batch of 3 rows with 8 requests of n = 2 waiting: rows join as others finish, each with its own matcher."""
    constraint = make_constraint(regex=REGEX)
    requests = [
        Request(
            tok.encode("KING:"),
            SamplingConfig(max_new_tokens=50, seed=s, temperature=1.0),
            2,
            frozenset([tok.eot_id]),
            constraint=constraint,
        )
        for s in range(8)
    ]
    engine = Engine(model, tok, max_batch=3)
    out = [
        ("".join(p.text for p in pieces if p.index == i), [p for p in pieces if p.index == i][-1].finish)
        for pieces in engine.run(requests)
        for i in range(2)
    ]
    assert len(out) == 16 and all(f == "stop" and re.fullmatch(REGEX, t) for t, f in out), out


def test_rows_without_a_constraint_write_what_they_would_alone(model, tok):
    free = [
        Request(tok.encode(p), SamplingConfig(max_new_tokens=30, seed=s, temperature=t), 1)
        for p, s, t in [("ROMEO:", 1, 0.0), ("JULIET:", 2, 1.0), ("KING:", 3, 0.8)]
    ]
    alone = Engine(model, tok).run(free)
    constrained = [
        Request(
            tok.encode("Dose?"),
            SamplingConfig(max_new_tokens=60, seed=s, temperature=t),
            1,
            constraint=make_constraint(**{k: VALID[k][0]}),
        )
        for s, (t, k) in enumerate([(0.0, "regex"), (1.0, "json_schema"), (1.0, "choices")])
    ]
    mixed = Engine(model, tok).run([constrained[0], free[0], constrained[1], free[1], free[2], constrained[2]])
    assert texts(alone) == texts([mixed[1], mixed[3], mixed[4]])
    assert [[p.token.id for p in r] for r in alone] == [[p.token.id for p in r] for r in (mixed[1], mixed[3], mixed[4])]


def test_an_end_token_comes_only_where_the_output_is_complete(model, tok):
    """A regex that could go on ([0-9]+): the row ends at <|endoftext|> or by length, and what it wrote matches."""
    runs = Engine(model, tok, max_batch=16).run(
        [
            Request(
                tok.encode("x"),
                SamplingConfig(max_new_tokens=12, seed=s, temperature=1.5),
                1,
                frozenset([tok.eot_id]),
                constraint=make_constraint(regex="[0-9]+"),
            )
            for s in range(16)
        ]
    )
    for pieces in runs:
        text = "".join(p.text for p in pieces)
        assert re.fullmatch("[0-9]+", text), text
        if pieces[-1].finish == "stop":
            assert pieces[-1].token.id == tok.eot_id


def test_the_lm_api_takes_each_kind_of_constraint(lm):
    assert re.fullmatch(REGEX, lm.generate("Dose:", regex=REGEX, temperature=0, max_new_tokens=20))
    assert "".join(lm.stream("Pick:", choices=CHOICES, seed=3, max_new_tokens=20)) in CHOICES
    for c in lm.complete(["A", "B", "C"], json_schema=SCHEMA, temperature=1.0, seed=1, max_new_tokens=200):
        assert c.finish_reason == "stop" and fits_schema(c.text)
    obj = lm.complete("{", json_object=True, temperature=0, max_new_tokens=200)[0]
    assert obj.finish_reason != "stop" or isinstance(json.loads(obj.text), dict)
    assert lm.generate_batch(["a", "b"], grammar=GRAMMAR, temperature=0.5, seed=2, max_new_tokens=20)[0].startswith(
        "take "
    )


@pytest.mark.parametrize(
    "given, message",
    [
        (dict(regex="[0-9+"), "the regular expression cannot be used: "),
        (dict(json_schema={"type": "bogus"}), "the JSON schema cannot be used: "),
        (dict(json_schema="{not json"), "not valid JSON"),
        (dict(grammar="start: foo"), "the grammar cannot be used: "),
        (dict(choices=[]), "non-empty list"),
        (dict(choices="aspirin"), "non-empty list"),
        (dict(regex="a", choices=["a"]), "at most one constraint"),
    ],
)
def test_a_constraint_that_cannot_compile_is_one_clear_config_error(lm, given, message):
    with pytest.raises(ConfigError) as e:
        lm.generate("x", max_new_tokens=5, **given)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model, tok):
    return write_run(tmp_path_factory.mktemp("constrained") / "run", model, tok)


def test_cli_generate_and_chat_flags(run_dir, tmp_path, capsys):
    (tmp_path / "choices.txt").write_text("\n".join(CHOICES) + "\n", encoding="utf-8")
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA), encoding="utf-8")
    assert main(["generate", str(run_dir), "Dose:", "--choices", str(tmp_path / "choices.txt"), "--seed", "1"]) == 0
    assert capsys.readouterr().out.removesuffix("\n") in CHOICES
    assert (
        main(["generate", str(run_dir), "A", "B", "--json-schema", str(tmp_path / "schema.json"), "--temperature", "0"])
        == 0
    )
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("---")]
    assert len(lines) == 2 and all(fits_schema(ln) for ln in lines)
    assert main(["generate", str(run_dir), "x", "--regex", REGEX, "--temperature", "0"]) == 0
    assert re.fullmatch(REGEX, capsys.readouterr().out.removesuffix("\n"))
    for argv, message in [
        (["generate", str(run_dir), "--regex", "[0-9+"], "the regular expression cannot be used"),
        (["chat", str(run_dir), "--regex", "[0-9+"], "the regular expression cannot be used"),
        (["generate", str(run_dir), "--json-schema", str(tmp_path / "none.json")], "no JSON schema file"),
        (["generate", str(run_dir), "--regex", "a", "--json-object"], "at most one constraint"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_a_chat_session_keeps_its_constraint_turn_after_turn(lm):
    from gradlm.generation.session import ChatSession

    chat = ChatSession(
        lm,
        sampling=SamplingConfig(temperature=1.0, seed=4, max_new_tokens=20),
        constraint=make_constraint(choices=CHOICES),
    )
    assert all("".join(chat.send(q)) in CHOICES for q in ["Class of zorvastatin?", "And of lisoprel?", "Again?"])


def test_openai_client_response_format_round_trip_and_gradlm_extras(lm):
    with live(create_app(lm, "tiny")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        fmt = {"type": "json_schema", "json_schema": {"name": "dose", "schema": SCHEMA, "strict": True}}
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Dose?"}],
            response_format=fmt,
            n=3,
            seed=5,
            max_tokens=200,
        )
        assert all(c.finish_reason == "stop" and fits_schema(c.message.content) for c in r.choices)
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Any JSON"}],
            response_format={"type": "json_object"},
            temperature=0,
            max_tokens=150,
        )
        assert r.choices[0].finish_reason != "stop" or isinstance(json.loads(r.choices[0].message.content), dict)
        r = client.completions.create(
            model="tiny", prompt="Class:", extra_body={"choices": CHOICES}, n=4, seed=1, max_tokens=20
        )
        assert all(c.text in CHOICES for c in r.choices)
        stream = client.completions.create(
            model="tiny", prompt="Dose:", extra_body={"regex": REGEX}, stream=True, seed=2, max_tokens=20
        )
        assert re.fullmatch(REGEX, "".join(c.choices[0].text for c in stream if c.choices))
        with httpx.Client(base_url=url, timeout=60) as http:
            for body, param, message in [
                ({"regex": "[0-9+"}, None, "the regular expression cannot be used"),
                (
                    {
                        "response_format": {
                            "type": "json_schema",
                            "json_schema": {"name": "x", "schema": {"type": "bogus"}},
                        }
                    },
                    None,
                    "the JSON schema cannot be used",
                ),
                (
                    {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
                    "response_format",
                    "needs",
                ),
                ({"response_format": {"type": "xml"}}, "response_format", "response_format must be"),
                ({"choices": "aspirin"}, "choices", "non-empty list"),
                ({"regex": "a", "choices": ["a"]}, "choices", "at most one constraint"),
            ]:
                r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **body})
                assert r.status_code == 400, r.text
                err = r.json()["error"]
                assert message in err["message"] and err["param"] == param, err


# ---- a constraint that compiles and fails while decoding ---------------------------------------------------

# llguidance compiles this regex, then gives up at the first token ("too many expressions constructed"): the
# matcher stops in an error state. Read as "stopped", it once came back as finish "stop" with the text "a".
LATE = r"a{1000}{1000}"


def test_a_constraint_that_fails_while_decoding_ends_its_row_with_an_error(model, tok):
    requests = [
        Request(
            tok.encode("x"),
            SamplingConfig(max_new_tokens=20, temperature=0),
            1,
            frozenset([tok.eot_id]),
            constraint=make_constraint(regex=LATE),
        ),
        Request(
            tok.encode("Dose:"),
            SamplingConfig(max_new_tokens=20, temperature=0),
            1,
            frozenset([tok.eot_id]),
            constraint=make_constraint(regex=REGEX),
        ),
        Request(
            tok.encode("y"),
            SamplingConfig(max_new_tokens=5, temperature=1.0, seed=1),
            1,
            frozenset([tok.eot_id]),
            constraint=make_constraint(regex=LATE),
        ),
    ]
    late, fine, sampled = Engine(model, tok, max_batch=3).run(requests)  # one batch: the failing rows end alone
    for pieces in (late, sampled):
        assert pieces[-1].finish == "error" and "could not be followed while decoding" in pieces[-1].error
        assert "too many expressions" in pieces[-1].error and "".join(p.text for p in pieces) != "a" * 1000 * 1000
        assert all(p.error is None and p.finish is None for p in pieces[:-1])
    assert fine[-1].finish == "stop" and fine[-1].error is None and re.fullmatch(REGEX, "".join(p.text for p in fine))


def test_the_api_and_the_cli_say_a_late_failure_instead_of_answering(lm, run_dir, capsys):
    [c] = lm.complete("x", regex=LATE, temperature=0, max_new_tokens=20)
    assert c.finish_reason == "error" and "simplify the constraint" in c.error
    for call in (
        lambda: lm.generate("x", regex=LATE, temperature=0),
        lambda: "".join(lm.stream("x", regex=LATE, temperature=0)),
    ):
        with pytest.raises(ConstraintError, match="the regular expression could not be followed while decoding"):
            call()
    for argv in (
        ["generate", str(run_dir), "x", "--regex", LATE],
        ["generate", str(run_dir), "x", "y", "--regex", LATE],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "could not be followed while decoding" in err and err.count("\n") == 1, err


def test_a_chat_says_a_late_failure_and_goes_on(lm):
    import io

    from gradlm.generation.session import ChatSession, chat_loop

    chat = ChatSession(
        lm, sampling=SamplingConfig(temperature=0, max_new_tokens=20), constraint=make_constraint(regex=LATE)
    )
    lines, out, err = ["hi", "again"], io.StringIO(), io.StringIO()

    def read(_):
        if not lines:
            raise EOFError
        return lines.pop(0)

    chat_loop(chat, read=read, out=out, err=err)
    assert err.getvalue().count("error: the regular expression could not be followed while decoding") == 2
    assert [t["role"] for t in chat.turns] == ["user", "assistant", "user", "assistant"]


def test_the_server_marks_a_late_failure_in_the_choice(lm):
    with live(create_app(lm, "tiny")) as url, httpx.Client(base_url=url, timeout=60) as http:
        r = http.post(
            "/v1/completions", json={"prompt": "x", "regex": LATE, "max_tokens": 20, "n": 2, "temperature": 0}
        )
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            assert choice["finish_reason"] == "error" and choice["error"]["code"] == "constraint_failed", choice
        r = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "regex": LATE, "max_tokens": 20},
        )
        [choice] = r.json()["choices"]
        assert choice["finish_reason"] == "error" and "could not be followed" in choice["error"]["message"]
        body = {"messages": [{"role": "user", "content": "hi"}], "regex": LATE, "max_tokens": 20, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        last = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert [c["finish_reason"] for c in last] == ["error"] and last[0]["error"]["code"] == "constraint_failed"


def test_qa_with_answers_choices_reports_exact_match_both_ways(run_dir, tmp_path, capsys):
    from gradlm.evaluation.evaluate import EvalConfig, format_report, run_eval

    qa = tmp_path / "qa.jsonl"
    rows = [
        ("Class of zorvastatin?", "statin", "train"),
        ("Class of lisoprel?", "ACE inhibitor", "train"),
        ("zorvastatn class?", "statin", "misspelled"),
    ]
    qa.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "split": s})
            + "\n"
            for q, a, s in rows
        ),
        encoding="utf-8",
    )
    from gradlm.rundir import load_model

    m, tok = load_model(run_dir)
    report = run_eval(m, tok, EvalConfig(qa=[str(qa)], answers="choices", progress=False))
    c = report["qa_choices"]
    assert c["answers"] == ["statin", "ACE inhibitor"]
    assert all(p["got"] in c["answers"] for p in c["predictions"])
    assert set(c["splits"]) == set(report["qa"]["splits"]) == {"train", "misspelled"}
    text = format_report(report)
    assert "choices (2 answers)" in text and re.search(r"misspelled +\d\.\d{3} \(\d/1\) +\d\.\d{3} \(\d/1\)", text), (
        text
    )
    assert main(["eval", str(run_dir), "--qa", str(qa), "--answers", "choices"]) == 0
    assert "choices (2 answers)" in capsys.readouterr().out
    assert main(["eval", str(run_dir), "--qa", str(qa), "--answers", "some"]) == 2
    assert "--answers must be free or choices" in capsys.readouterr().err
