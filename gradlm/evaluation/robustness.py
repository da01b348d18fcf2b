"""Where the typo penalty goes, word by word, and held-out typo splits of a text (gradlm eval --typos)."""

from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np
import torch

from gradlm.text.typos import misspell
from gradlm.text.tokenizer import Tokenizer

from gradlm.text.augment import WORDS, _byte_offsets


def _word_bits(
    tok: Tokenizer, doc: str, ids: list[int], bits: np.ndarray
) -> tuple[list[str], np.ndarray, list[list[int]]]:
    """The words (runs of letters) of doc, the bits spent on the tokens of each, and those tokens.

    A token belongs to the word it overlaps, taken with the space or sign before it (' the'), the way
    the pre-tokenizer cuts words (a pre-token holds at most one run of letters); other tokens (newlines,
    punctuation, numbers) belong to none."""
    matches = list(WORDS.finditer(doc))
    off = _byte_offsets(doc)
    run_start = np.array([off[m.start()] for m in matches], dtype=np.int64)
    run_end = np.array([off[m.end()] for m in matches], dtype=np.int64)
    lengths = np.array([len(tok.pieces[i]) for i in ids], dtype=np.int64)
    tok_end = np.cumsum(lengths)
    tok_start = tok_end - lengths
    k = np.searchsorted(run_end, tok_start, side="right")
    ok = k < len(matches)
    ok[ok] &= run_start[k[ok]] < tok_end[ok]
    word_bits = np.bincount(k[ok], weights=bits[ok], minlength=len(matches))
    tokens: list[list[int]] = [[] for _ in matches]
    for i, w in zip(np.asarray(ids)[ok].tolist(), k[ok].tolist()):
        tokens[w].append(i)
    return [m.group(1) for m in matches], word_bits, tokens


def _docs_word_bits(tok: Tokenizer, docs: list[str], nll: torch.Tensor) -> tuple[list, float]:
    """Each document's _word_bits, read off the per-token losses of all of them, and the total bits."""
    bits = np.concatenate([[0.0], nll.double().numpy() / np.log(2)])  # bits of seq[j]; seq[0] is not predicted
    pos, per_doc = 0, []
    for d in docs:
        ids = tok.encode(d)
        pos += tok.eot_id >= 0  # the <|endoftext|> before each document
        per_doc.append(_word_bits(tok, d, ids, bits[pos : pos + len(ids)]))
        pos += len(ids)
    if pos != len(bits):
        raise ValueError("the per-token losses do not match the documents")
    return per_doc, float(bits.sum())


def word_penalties(
    tok: Tokenizer,
    clean_docs: list[str],
    noisy_docs: list[str],
    clean_nll: torch.Tensor,
    noisy_nll: torch.Tensor,
    top: int = 10,
) -> dict:
    """Where the extra bits of noisy text go: the misspelled words themselves or the text around them,
    how their split changes, and the words that cost the most.

    clean_nll / noisy_nll: evaluate_text(..., keep_nll=True).nll of the documents (each preceded by
    <|endoftext|>); noisy_docs are inject_typos copies of clean_docs, so their words pair up one to one."""
    clean_side, clean_total = _docs_word_bits(tok, clean_docs, clean_nll)
    noisy_side, noisy_total = _docs_word_bits(tok, noisy_docs, noisy_nll)
    groups: dict[str, dict] = {}
    n = extra_misspelled = tokens_clean = tokens_noisy = 0
    for (cw, cb, ct), (nw, nb, nt) in zip(clean_side, noisy_side):
        if len(cw) != len(nw):
            raise ValueError("noisy text whose words do not pair up with the clean text's (not made by inject_typos)")
        for k in (k for k in range(len(cw)) if cw[k] != nw[k]):
            n += 1
            extra_misspelled += nb[k] - cb[k]
            tokens_clean += len(ct[k])
            tokens_noisy += len(nt[k])
            g = groups.setdefault(
                cw[k],
                {
                    "word": cw[k],
                    "times": 0,
                    "extra_bits": 0.0,
                    "clean_split": [tok.pieces[i].decode("utf-8", "replace") for i in ct[k]],
                    "example": nw[k],
                    "example_split": [tok.pieces[i].decode("utf-8", "replace") for i in nt[k]],
                },
            )
            g["times"] += 1
            g["extra_bits"] += nb[k] - cb[k]
    extra = noisy_total - clean_total
    worst = sorted(groups.values(), key=lambda g: -g["extra_bits"])[:top]
    for g in worst:
        g["extra_bits_each"] = g["extra_bits"] / g["times"]
    return {
        "misspelled_words": n,
        "tokens_per_word_clean": tokens_clean / max(n, 1),
        "tokens_per_word_noisy": tokens_noisy / max(n, 1),
        "extra_bits": extra,
        "extra_bits_in_misspelled_words": float(extra_misspelled),
        "extra_bits_elsewhere": float(extra - extra_misspelled),
        "extra_bits_per_misspelled_word": float(extra_misspelled) / max(n, 1),
        "top": worst,
    }


def format_word_penalties(w: dict) -> str:
    """The per-word view that `gradlm eval --typos` prints."""
    if not w["misspelled_words"]:
        return "per word: no word was misspelled"
    share = w["extra_bits_in_misspelled_words"] / w["extra_bits"] if w["extra_bits"] else float("nan")
    lines = [
        f"per word: {w['misspelled_words']:,} misspelled words, split into {w['tokens_per_word_clean']:.2f} -> "
        f"{w['tokens_per_word_noisy']:.2f} tokens "
        f"and costing {w['extra_bits_per_misspelled_word']:+.2f} bits each; of the {w['extra_bits']:+,.0f} extra "
        f"bits, {share:.0%} are on the "
        f"misspelled words and {1 - share:.0%} on the text around them",
        f"  {'word':<14} {'times':>5} {'extra bits':>10}  clean split -> one misspelling's split",
    ]
    for g in w["top"]:
        clean, noisy = " ".join(repr(p) for p in g["clean_split"]), " ".join(repr(p) for p in g["example_split"])
        lines.append(f"  {g['word']:<14} {g['times']:>5} {g['extra_bits_each']:>+10.2f}  {clean} -> {noisy}")
    return "\n".join(lines)


class TypoSplit(NamedTuple):
    kind: str
    text: str
    ids: list[int]


def typo_splits(tok: Tokenizer, text: str, n: int, seed: int = 0) -> list[TypoSplit]:
    """Up to n different misspellings of text (one typo each, evaluate.misspell) and how each splits:
    what `gradlm tokenize --typos N` shows."""
    rng = random.Random(seed)
    out: list[TypoSplit] = []
    for _ in range(50 * n):
        if len(out) == n:
            break
        typo, kind = misspell(text, rng)
        if all(typo != s.text for s in out):
            out.append(TypoSplit(kind, typo, tok.encode(typo)))
    return out
