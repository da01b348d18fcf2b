"""Generate drugqa: a question-answering dataset about fictional drugs, to fine-tune and measure on.

Every fact is made up here, from a seed; nothing is copied from anywhere. Each drug gets a name built
from syllables (a rare word, like the drug names a tokenizer has never seen whole) and three properties
that cannot be guessed from that name: a class, a maximum daily dose and one interaction partner. Name
endings such as "-statin" or "-cillin" are drawn independently of the class on purpose, so a model has
to learn each fact rather than read it off the spelling.

Files written (into this folder unless --out says otherwise):

    drugs.tsv         the table: name, class, maximum daily dose, interacts with
    facts.txt         the facts as plain prose, to pretrain a base model on
    train.jsonl       every fact asked in each training phrasing           {"messages": [...], "split": "train"}
    heldout.jsonl     every fact asked once in a phrasing never trained on  (same facts, new wording)
    misspelled.jsonl  every fact asked once in a training phrasing, the drug name with one typo
                      (a dropped, swapped, doubled or neighbouring-key letter; gradlm.evaluation.evaluate.misspell)

Answers are short and exact ("40 mg", "a statin", "zorvastatin"), so exact match is meaningful:

    python examples/drugqa/make_drugqa.py                      # the shipped files (seed 0, 80 drugs)
    gradlm eval RUN --qa examples/drugqa/train.jsonl examples/drugqa/heldout.jsonl examples/drugqa/misspelled.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from gradlm.text.typos import NAME_TYPO_KINDS, misspell

# Syllables chosen to sound drug-like without spelling a real drug.
ONSETS = ("zor", "quel", "vex", "dral", "thrim", "plox", "brin", "cav", "jex", "kulm", "skar", "trev",
          "wyl", "yost", "fint", "gorm", "hax", "lurb", "mip", "nesk", "pand", "tesk", "ulv", "vurn")
MIDDLES = ("a", "e", "i", "o", "u", "va", "ma", "ri", "lo", "ne", "ta", "xi")
ENDINGS = ("statin", "maprine", "zolam", "tidine", "vorant", "pexil", "dronate", "fenide", "cillin", "dazone")
CLASSES = ("a statin", "a beta blocker", "an anticoagulant", "an antihistamine", "a diuretic",
           "an antibiotic", "an antidepressant", "an anticonvulsant")
DOSES = ("5 mg", "10 mg", "20 mg", "25 mg", "40 mg", "50 mg", "80 mg", "100 mg", "150 mg", "200 mg",
         "250 mg", "300 mg", "400 mg", "500 mg", "600 mg", "800 mg", "1000 mg")
PROPERTIES = ("class", "dose", "interaction")

# Questions: {d} is the drug's name. Held-out phrasings never appear in training.
TRAIN_TEMPLATES = {
    "class": ("What class of drug is {d}?", "Which drug class does {d} belong to?", "What type of drug is {d}?"),
    "dose": ("What is the maximum daily dose of {d}?", "How much {d} can be taken per day at most?", "Max daily dose of {d}?"),
    "interaction": ("Which drug interacts with {d}?", "What drug should not be combined with {d}?", "Name the drug that interacts with {d}."),
}
HELDOUT_TEMPLATES = {
    "class": ("Tell me the drug class of {d}.", "To which class of medicines does {d} belong?"),
    "dose": ("What is the highest amount of {d} allowed in one day?", "Up to how much {d} may a patient take daily?"),
    "interaction": ("Which medicine must be avoided together with {d}?", "With which drug does {d} have a dangerous interaction?"),
}
FACT_SENTENCES = {
    "class": ("The drug {d} is {a}.", "Doctors classify {d} as {a}."),
    "dose": ("The maximum daily dose of {d} is {a}.", "Patients should take no more than {a} of {d} per day."),
    "interaction": ("The drug {d} interacts with {a}.", "Taking {d} together with {a} causes a dangerous interaction."),
}


def make_names(n: int, rng: random.Random) -> list[str]:
    """n distinct drug names from the syllable lists, in a seeded order."""
    pool = sorted({o + m + e for o in ONSETS for m in MIDDLES for e in ENDINGS})
    if n > len(pool):
        raise SystemExit(f"at most {len(pool)} names can be made from these syllables, asked for {n}")
    return rng.sample(pool, n)


def make_table(n: int, seed: int) -> list[dict]:
    """n drugs with a class, a dose and an interaction partner; partners come in pairs (a <-> b), so
    "which drug interacts with X?" has exactly one answer."""
    if n < 2 or n % 2:
        raise SystemExit(f"the number of drugs must be even and at least 2 (drugs interact in pairs), got {n}")
    rng = random.Random(seed)
    names = make_names(n, rng)
    drugs = [{"name": d, "class": rng.choice(CLASSES), "dose": rng.choice(DOSES)} for d in names]
    order = list(range(n))
    rng.shuffle(order)
    for a, b in zip(order[0::2], order[1::2]):
        drugs[a]["interaction"], drugs[b]["interaction"] = drugs[b]["name"], drugs[a]["name"]
    return drugs


def qa_line(question: str, answer: str, split: str, drug: dict, prop: str, **extra) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "split": split, "drug": drug["name"], "property": prop, **extra}


def make_splits(drugs: list[dict], seed: int) -> dict[str, list[dict]]:
    """train (every fact x every training phrasing), heldout and misspelled (every fact once each)."""
    rng = random.Random(seed + 1)
    names = {d["name"] for d in drugs}
    train, heldout, misspelled = [], [], []
    k = 0
    for d in drugs:
        for prop in PROPERTIES:
            for t in TRAIN_TEMPLATES[prop]:
                train.append(qa_line(t.format(d=d["name"]), d[prop], "train", d, prop))
            heldout.append(qa_line(rng.choice(HELDOUT_TEMPLATES[prop]).format(d=d["name"]), d[prop], "heldout", d, prop))
            kind = NAME_TYPO_KINDS[k % len(NAME_TYPO_KINDS)]  # the kinds take turns, so each is a quarter
            k += 1
            typo, _ = misspell(d["name"], rng, (kind,))
            while typo in names:  # a typo that spells another drug would change the question
                typo, _ = misspell(d["name"], rng, (kind,))
            question = rng.choice(TRAIN_TEMPLATES[prop]).format(d=typo)
            misspelled.append(qa_line(question, d[prop], "misspelled", d, prop, typo=kind, misspelled=typo))
    rng.shuffle(train)
    return {"train": train, "heldout": heldout, "misspelled": misspelled}


def facts_text(drugs: list[dict], seed: int) -> str:
    """One paragraph per drug, each fact in one of its prose phrasings (seeded)."""
    rng = random.Random(seed + 2)
    paragraphs = []
    for d in drugs:
        sentences = [rng.choice(FACT_SENTENCES[p]).format(d=d["name"], a=d[p]) for p in PROPERTIES]
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


def write(out: Path, drugs: list[dict], splits: dict[str, list[dict]], facts: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = ["name\tclass\tmax_daily_dose\tinteracts_with"] + [f"{d['name']}\t{d['class']}\t{d['dose']}\t{d['interaction']}" for d in drugs]
    (out / "drugs.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (out / "facts.txt").write_text(facts, encoding="utf-8")
    for name, lines in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--drugs", type=int, default=80, help="how many fictional drugs (even; default 80)")
    p.add_argument("--seed", type=int, default=0, help="seed of names, facts, phrasings and typos (default 0)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder to write into (default: next to this script)")
    args = p.parse_args(argv)
    drugs = make_table(args.drugs, args.seed)
    splits = make_splits(drugs, args.seed)
    write(Path(args.out), drugs, splits, facts_text(drugs, args.seed))
    counts = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    print(f"wrote {args.drugs} drugs to {args.out}: {counts} questions, facts.txt, drugs.tsv")


if __name__ == "__main__":
    main()
