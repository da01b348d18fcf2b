"""Question answering: exact-match scoring of greedy chat replies (gradlm/evaluation/evaluate.py), one-typo
misspellings, and the shipped drugqa dataset (examples/drugqa) being what its seeded script makes."""

from __future__ import annotations

import importlib.util
import json
import random
import string
import sys
from collections import Counter
from pathlib import Path

import pytest

from gradlm import files as ckpt
from gradlm.cli import main
from gradlm.errors import DataError
from gradlm.evaluation.evaluate import EvalConfig, format_report, load_qa, normalize_answer, run_eval, score_qa
from gradlm.text.typos import NAME_TYPO_KINDS, misspell, near_keys
from gradlm.text.sft import load_sft

from conftest import sft_fit

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice

DRUGQA = Path(__file__).resolve().parents[1] / "examples" / "drugqa"
FACTS = [("zorvastatin", "40 mg"), ("quelmaprine", "a statin"), ("dralixil", "Brinavorant"), ("plexomab", "250 mg")]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def qa_rows(split: str | None = None, wrong: bool = False) -> list[dict]:
    rows = []
    for drug, answer in FACTS:
        row = {"prompt": f"Tell me about {drug}.", "completion": "nothing" if wrong else answer}
        if split:
            row["split"] = split
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def taught(tmp_path_factory, tok):
    """A tiny model fine-tuned on FACTS until it answers them, saved as a run directory."""
    d = tmp_path_factory.mktemp("qa")
    data = load_sft(write_jsonl(d / "train.jsonl", qa_rows()), tok, 32)
    model = sft_fit(data.examples, tok)
    run = d / "run"
    run.mkdir()
    ckpt.atomic_write_json(run / "config.json", {"model": model.cfg.to_dict()})
    tok.save(run / "tokenizer.json")
    ckpt.save_weights(run / "model.safetensors", model.state_dict())
    return model, run


# ---- scoring -------------------------------------------------------------------------------------------


def test_normalized_exact_match():
    assert normalize_answer("  40   MG\n") == normalize_answer("40 mg") == "40 mg"
    assert normalize_answer("40mg") != normalize_answer("40 mg")
    assert normalize_answer("a statin.") != normalize_answer("a statin")


def test_a_taught_model_answers_exactly_and_wrong_answers_score_zero(taught, tok, tmp_path):
    model, _ = taught
    right = load_qa(write_jsonl(tmp_path / "right.jsonl", qa_rows()))
    wrong = load_qa(write_jsonl(tmp_path / "wrong.jsonl", qa_rows(wrong=True)))
    s = score_qa(model, tok, right + wrong, batch=3)
    assert s.splits == {
        "right": {"items": 4, "correct": 4, "accuracy": 1.0},
        "wrong": {"items": 4, "correct": 0, "accuracy": 0.0},
    }
    assert (s.items, s.correct, s.accuracy) == (8, 4, 0.5)
    assert [p["got"] for p in s.predictions[:4]] == [a for _, a in FACTS]  # <|end|> stops and is not shown
    # Batching never changes a reply.
    assert [p["got"] for p in score_qa(model, tok, right, batch=1).predictions] == [a for _, a in FACTS]


def test_split_field_overrides_the_file_name_and_case_is_ignored(taught, tok, tmp_path):
    model, _ = taught
    rows = qa_rows(split="heldout")
    rows[0]["completion"] = rows[0]["completion"].upper() + "  "
    rows[1] = {
        "messages": [
            {"role": "user", "content": rows[1]["prompt"]},
            {"role": "assistant", "content": rows[1]["completion"]},
        ],
        "split": "other",
    }
    s = score_qa(model, tok, load_qa(write_jsonl(tmp_path / "mixed.jsonl", rows)))
    assert s.splits["heldout"] == {"items": 3, "correct": 3, "accuracy": 1.0} and s.splits["other"]["correct"] == 1


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "user", "content": "q"}]}, "must end with the assistant's expected answer"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "must end with the assistant's expected answer"),
        ({"prompt": "q", "completion": "a", "split": 3}, '"split" must be a non-empty string'),
        ({"question": "q"}, "has neither"),
    ],
)
def test_bad_qa_lines_name_their_line(tmp_path, row, message):
    with pytest.raises(DataError, match=f"line 2.*{message}"):
        load_qa(write_jsonl(tmp_path / "bad.jsonl", [qa_rows()[0], row]))


def test_a_question_longer_than_the_window_is_refused(taught, tok, tmp_path):
    model, _ = taught
    items = load_qa(write_jsonl(tmp_path / "long.jsonl", [{"prompt": "why " * 40, "completion": "because"}]))
    with pytest.raises(DataError, match="line 1: the question is .* tokens, more than the context window"):
        score_qa(model, tok, items)


def test_run_eval_and_report(taught, tok, tmp_path):
    model, _ = taught
    files = [
        write_jsonl(tmp_path / "train.jsonl", qa_rows()),
        write_jsonl(tmp_path / "typo.jsonl", qa_rows(wrong=True)),
    ]
    r = run_eval(model, tok, EvalConfig(qa=files, progress=False))
    assert r["qa"]["splits"]["train"]["accuracy"] == 1.0 and r["qa"]["splits"]["typo"]["accuracy"] == 0.0
    text = format_report(r)
    assert "train        1.000 (4/4)" in text and "all          0.500 (4/8)" in text


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


def test_cli_eval_qa_json_per_file(taught, tmp_path, capsys):
    _, run = taught
    a = write_jsonl(tmp_path / "a.jsonl", qa_rows())
    b = write_jsonl(tmp_path / "b.jsonl", qa_rows(wrong=True))
    assert run_cli(["eval", str(run), "--qa", a, b, "--json", "--no-progress"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["qa"]["splits"]["a"]["correct"] == 4 and r["qa"]["splits"]["b"]["correct"] == 0 and r["qa_files"] == [a, b]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--qa", "missing.jsonl"], "no such file"),
        (["--qa", "QA", "--qa-max-tokens", "0"], "--qa-max-tokens"),
        ([], "nothing to evaluate"),
    ],
)
def test_cli_eval_qa_errors_exit_2_with_one_line(taught, tmp_path, capsys, args, message):
    _, run = taught
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows())
    code = run_cli(["eval", str(run)] + [qa if a == "QA" else a for a in args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


# ---- misspellings --------------------------------------------------------------------------------------


def test_near_keys_are_mutual_and_keep_case():
    for a in string.ascii_lowercase:
        assert a not in near_keys(a) and 2 <= len(near_keys(a)) <= 6
        for b in near_keys(a):
            assert a in near_keys(b), (a, b)
    assert near_keys("G") == near_keys("g").upper() and set(near_keys("s")) == set("adwezx")
    assert near_keys("1") == ""


@pytest.mark.parametrize("kind", NAME_TYPO_KINDS)
def test_misspell_makes_exactly_one_typo_of_its_kind(kind):
    rng = random.Random(0)
    for word in ["zorvastatin", "quelmaprine", "abba", "Dralixil", "ok"]:
        for _ in range(30):
            new, got = misspell(word, rng, (kind,))
            assert got == kind and new != word
            if kind == "drop":
                assert len(new) == len(word) - 1 and any(word[:i] + word[i + 1 :] == new for i in range(len(word)))
            elif kind == "double":
                assert any(word[: i + 1] + word[i:] == new for i in range(len(word)))
            elif kind == "swap":
                assert any(word[:i] + word[i + 1] + word[i] + word[i + 2 :] == new for i in range(len(word) - 1))
            else:
                diff = [i for i in range(len(word)) if word[i] != new[i]]
                assert len(new) == len(word) and len(diff) == 1 and new[diff[0]] in near_keys(word[diff[0]])
    assert misspell("zorvastatin", random.Random(5)) == misspell("zorvastatin", random.Random(5))


# ---- the shipped dataset ------------------------------------------------------------------------------


def _script():
    spec = importlib.util.spec_from_file_location("make_drugqa", DRUGQA / "make_drugqa.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_drugqa"] = module
    spec.loader.exec_module(module)
    return module


def test_the_shipped_files_are_what_the_seeded_script_makes(tmp_path):
    _script().main(["--out", str(tmp_path)])
    for name in ("drugs.tsv", "facts.txt", "train.jsonl", "heldout.jsonl", "misspelled.jsonl"):
        assert (tmp_path / name).read_bytes() == (DRUGQA / name).read_bytes(), name
    assert sum(p.stat().st_size for p in DRUGQA.iterdir()) < 1_000_000


def test_drugqa_facts_are_consistent_and_the_splits_test_what_they_claim():
    rows = [line.split("\t") for line in (DRUGQA / "drugs.tsv").read_text().splitlines()[1:]]
    drugs = {name: {"class": c, "dose": dose, "interaction": partner} for name, c, dose, partner in rows}
    assert len(drugs) == len(rows) == 80
    for name, d in drugs.items():
        assert d["interaction"] != name and drugs[d["interaction"]]["interaction"] == name  # pairs: one answer
    splits = {
        s: [json.loads(x) for x in (DRUGQA / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "heldout", "misspelled")
    }
    assert {s: len(v) for s, v in splits.items()} == {"train": 720, "heldout": 240, "misspelled": 240}
    for split, lines in splits.items():
        for x in lines:
            question, answer = x["messages"][0]["content"], x["messages"][1]["content"]
            assert x["split"] == split and answer == drugs[x["drug"]][x["property"]]
            assert (x.get("misspelled") or x["drug"]) in question
    train_questions = {x["messages"][0]["content"].replace(x["drug"], "{d}") for x in splits["train"]}
    assert len(train_questions) == 9
    assert not {x["messages"][0]["content"].replace(x["drug"], "{d}") for x in splits["heldout"]} & train_questions
    for x in splits["misspelled"]:
        assert x["misspelled"] != x["drug"] and x["misspelled"] not in drugs
        assert x["messages"][0]["content"].replace(x["misspelled"], "{d}") in train_questions
    assert Counter(x["typo"] for x in splits["misspelled"]) == {k: 60 for k in NAME_TYPO_KINDS}
    facts = (DRUGQA / "facts.txt").read_text()
    assert all(name in facts and d["dose"] in facts for name, d in drugs.items())
    assert {it.split for it in load_qa([str(DRUGQA / "heldout.jsonl"), str(DRUGQA / "misspelled.jsonl")])} == {
        "heldout",
        "misspelled",
    }
