"""Robustness to misspelled and rare words: BPE-dropout and typo augmentation of training batches (where the
typo penalty goes, word by word, is gradlm/evaluation/robustness.py).

The problem: BPE reads a word it has learned in a few familiar tokens, but a misspelling of it in other,
smaller pieces ("queletidine" -> 'qu' 'e' 'letidine', "queleidine" -> 'qu' 'e' 'le' 'i' 'dine' with the
drug QA tokenizer), and a model trained only on the deterministic split has rarely read those pieces
together. Two augmentations, applied each time a batch is drawn, make it read words from their pieces:

  --bpe-dropout P   the window's text is re-segmented with every merge skipped with probability P
                    (Provilkov et al. 2020), so the model sees the same words in many splits;
  --typo-rate R     first, each letter gets a typo with probability R (drop, swap, double, near key, case;
                    typos.inject_typos), so it reads misspelled words in context.

Targets stay on the clean text. An input position whose text ends where a clean token begins predicts
that token, in the deterministic split. Inside a misspelled word, where no clean token begins, a position
predicts the next input token if that token holds no typo: the rest of the word as it is spelled around the
typo ("thoruoghly" read as ' th' 'or' 'uo' 'ghly': ' th' predicts 'or', 'uo' predicts 'ghly'), which follows
from what was typed. A position whose next token holds a typo ('or' -> 'uo'), or that lies inside a split
token, carries no loss: predicting it would teach the model to write typos. So the model learns to read any
split and noisy words, and to finish a word as it was begun, but never to make a typo; evaluation,
generation and the saved tokenizer.json stay deterministic. (In fine-tuning the changed turns carry no loss
at all.) Without the word-piece targets, the typo penalty fell half as much (docs/benchmarks.md).

Speed: re-segmenting is our own BPE over the tokenizer's merge ranks, all the words of a batch at once
as rows of a numpy array (one merge per row per step), seeded from the sampler's generator. HF tokenizers'
BPE(dropout=) draws from an unseeded thread RNG (resume could not be exact) and skips its cache, and
pre-computed segmentations multiply the token files; benchmarks/robustness.py --throughput measures all three.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import regex
import torch

from gradlm.errors import ConfigError
from gradlm.text.typos import NAME_TYPO_KINDS, Typos, inject_typos
from gradlm.text.tokenizer import SPLIT_PATTERN, Tokenizer

TRAIN_TYPO_KINDS = (*NAME_TYPO_KINDS, "case")  # the slips of a typist: drop, swap, double, near_key, case
PRE_TOKENS = regex.compile(SPLIT_PATTERN)
# a run of letters with the space or sign before it, as pre-tokens are
WORDS = regex.compile(r"[^\r\n\p{L}\p{N}]?(\p{L}+)")
_NONE = np.iinfo(np.int64).max  # rank of a pair that is not a merge


class Segmenter:
    """Byte-level BPE over a tokenizer's merge ranks, with optional BPE-dropout, for many words at once.

    The rule is tiktoken's, so with no dropout the ids are the tokenizer's own: repeatedly merge the
    adjacent pair whose concatenation is the lowest-ranked token (the leftmost on a tie). With dropout p,
    at each step every candidate pair is skipped with probability p and the best one left merges; a word
    whose candidates are all skipped stops there (the rule of HF tokenizers' BPE dropout).

        >>> seg = Segmenter(tok)
        >>> ids, counts = seg.segment([b" hello", b" world"], p=0.1, rng=np.random.default_rng(0))
    """

    def __init__(self, tok: Tokenizer):
        if tok.backend != "tiktoken":
            raise ConfigError(
                "--bpe-dropout and --typo-rate need a tokenizer trained by gradlm (ids in merge order); this one was "
                "imported"
            )
        specials = set(tok.specials.values())
        rank: dict[bytes, int] = {}
        for i, piece in enumerate(tok.pieces):
            if i not in specials and piece:
                rank.setdefault(piece, i)
        self.rank, self.vocab = rank, tok.vocab_size
        self.byte_ids = np.array([rank[bytes([b])] for b in range(256)], dtype=np.int64)
        # Every pair of tokens (a, b) whose concatenation is a token t: key a * vocab + b -> t, sorted by key.
        pairs = {}
        for piece, t in rank.items():
            for k in range(1, len(piece)):
                a, b = rank.get(piece[:k]), rank.get(piece[k:])
                if a is not None and b is not None:
                    pairs[a * self.vocab + b] = t
        keys = np.array(sorted(pairs), dtype=np.int64)
        self.keys = keys if len(keys) else np.array([-1], dtype=np.int64)
        self.merged = np.array([pairs[k] for k in keys.tolist()] or [0], dtype=np.int64)

    def segment(
        self, words: list[bytes], p: float = 0.0, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ids of each word, one after another, and how many ids each word got.

        Words are pre-tokens (never merged with each other). Rows are grouped by length (up to 8, 16,
        32, ... bytes) so that one long word does not widen every row."""
        if p > 0 and rng is None:
            raise ValueError("BPE-dropout needs a random generator")
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        out_ids, out_word = [], []
        low = 0
        width = 8
        while low < (lengths.max() if len(words) else 0):
            rows = np.flatnonzero((lengths > low) & (lengths <= width))
            if len(rows):
                sym = self._merge(self._bytes_matrix([words[r] for r in rows], width), p, rng)
                keep = sym >= 0
                out_ids.append(sym[keep])
                out_word.append(np.repeat(rows, keep.sum(1)))
            low, width = width, width * 2
        if not out_ids:
            return np.zeros(0, dtype=np.int64), np.zeros(len(words), dtype=np.int64)
        word = np.concatenate(out_word)
        order = np.argsort(word, kind="stable")  # back to word order; a word's ids keep their order
        return np.concatenate(out_ids)[order], np.bincount(word, minlength=len(words))

    def _bytes_matrix(self, words: list[bytes], width: int) -> np.ndarray:
        """(rows, width) byte ids, -1 after each word's end."""
        n = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        flat = np.frombuffer(b"".join(words), dtype=np.uint8)
        sym = np.full((len(words), width), -1, dtype=np.int64)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(n) - n, n)
        sym[np.repeat(np.arange(len(words)), n), cols] = self.byte_ids[flat]
        return sym

    def _merge(self, sym: np.ndarray, p: float, rng: np.random.Generator | None) -> np.ndarray:
        """Apply merges to every row of sym (rows, width) until none applies (or dropout stops a row)."""
        width = sym.shape[1]
        cols = np.arange(width)
        live = np.arange(len(sym))
        while len(live):
            s = sym[live]
            key = s[:, :-1] * self.vocab + s[:, 1:]
            at = np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)
            rank = np.where((s[:, 1:] >= 0) & (self.keys[at] == key), self.merged[at], _NONE)  # (rows, width - 1)
            if p > 0:
                rank[rng.random(rank.shape) < p] = _NONE
            j = rank.argmin(1)
            best = rank[np.arange(len(live)), j]
            go = best < _NONE
            live, s, j, best = live[go], s[go], j[go], best[go]
            # Merge the pair (j, j + 1) into best: shift everything after j + 1 one place left.
            src = cols + (cols > j[:, None])
            new = np.take_along_axis(s, np.minimum(src, width - 1), 1)
            new[src >= width] = -1
            new[np.arange(len(live)), j] = best
            sym[live] = new
        return sym

    def encode(self, text: str, p: float = 0.0, rng: np.random.Generator | None = None) -> list[int]:
        """Ids of ordinary text (special-token text is plain text), with BPE-dropout p. p = 0 gives
        exactly Tokenizer.encode(text)."""
        words = [w.encode("utf-8", "surrogateescape") for w in PRE_TOKENS.findall(text)]
        return self.segment(words, p, rng)[0].tolist()


# ---- training batches ------------------------------------------------------------------------------------


def _byte_offsets(text: str) -> np.ndarray:
    """UTF-8 byte offset of every character of text, and of its end (len(text) + 1 values); characters
    from surrogateescape (undecodable bytes) count one byte, as they encode back to one."""
    if text.isascii():
        return np.arange(len(text) + 1)
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    size = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000) - ((cp >= 0xDC80) & (cp <= 0xDCFF)) * 2
    return np.concatenate([[0], np.cumsum(size)])


def _common_ends(a: str, b: str) -> tuple[int, int]:
    """Characters a and b share at the start and (not overlapping those) at the end."""
    n = min(len(a), len(b))
    pre = 0
    while pre < n and a[pre] == b[pre]:
        pre += 1
    suf = 0
    while suf < n - pre and a[-1 - suf] == b[-1 - suf]:
        suf += 1
    return pre, suf


class Alignment(NamedTuple):
    """How a text with typos lines up with the clean text, in the noisy text's UTF-8 byte offsets."""

    offsets: np.ndarray  # (noisy bytes + 1,) the clean byte offset each noisy offset corresponds to, or -1
    words: np.ndarray  # (n, 2) start and end of each misspelled word
    edits: np.ndarray  # (n, 2) start and end of its typos: what lies between its common prefix and suffix with the
    # clean word (a dropped letter is an empty edit at the drop). A piece [s, t) holds no typo when t <= a or s >= b.


def align_typos(clean: str, typos: Typos) -> Alignment:
    """Line typos.text (inject_typos(clean, ...)) up with clean.

    inject_typos only edits letters inside words and never adds or removes a word, so everything outside
    the words it changed is the same text. In a misspelled word, the offsets within its common prefix and
    suffix with the clean word line up, those in between do not."""
    noisy = typos.text
    nb, cb = _byte_offsets(noisy), _byte_offsets(clean)
    spans = []
    shift = k = 0  # shift: len(noisy) - len(clean) over the edits before the current word
    while k < len(typos.at):
        cs = ce = typos.at[k][0]  # the clean word around this edit: its run of letters
        while cs > 0 and clean[cs - 1].isalpha():
            cs -= 1
        while ce < len(clean) and clean[ce].isalpha():
            ce += 1
        ns = cs + shift
        while k < len(typos.at) and typos.at[k][0] < ce:  # every edit in this word
            i, used, written = typos.at[k]
            shift += len(written) - used
            k += 1
        ne = ce + shift
        a, b = clean[cs:ce], noisy[ns:ne]
        if a == b:
            continue
        pre, suf = _common_ends(a, b)
        # Columns: the word's start and end, its edit's start and end, and how far clean offsets are ahead
        # of noisy ones from the edit's end on (up to the next word's edit).
        spans.append((nb[ns], nb[ne], nb[ns + pre], nb[ne - suf], cb[ce] - nb[ne]))
    spans = np.array(spans, dtype=np.int64).reshape(-1, 5)
    ahead = np.zeros(nb[-1] + 1, dtype=np.int64)
    ahead[spans[:, 3]] = np.diff(spans[:, 4], prepend=0)  # one edit end per word, so no two land on one offset
    offsets = np.arange(nb[-1] + 1) + np.cumsum(ahead)
    for a, b in spans[:, 2:4].tolist():  # inside an edit nothing lines up
        offsets[a + 1 : b] = -1
    return Alignment(offsets, spans[:, :2], spans[:, 2:4])


class RobustSampler:
    """Training batches with BPE-dropout and/or typos in the inputs, targets on the clean text.

    Wraps a sampler of (x, y) batches: windows of text (data.RandomSampler, EpochSampler), or, with
    context_only, fine-tuning conversations (sft.SFTSampler), where only the text that the loss does not
    cover (system and user turns) changes and the replies stay as they are. Each row's deterministic ids
    are decoded, given typos (typo_rate) and re-segmented (bpe_dropout); a target is the row's own target
    where it lines up (module docstring), else -1. Rows are cut to the context window `block`, and padded
    to the longest. Its random generator is separate from the inner sampler's and is saved in state_dict,
    so a resumed run draws exactly the batches an uninterrupted one would."""

    def __init__(
        self,
        inner,
        tok: Tokenizer,
        bpe_dropout: float,
        typo_rate: float,
        seed: int,
        block: int,
        context_only: bool = False,
    ):
        self.inner, self.tok, self.block, self.context_only = inner, tok, block, context_only
        self.p, self.rate = bpe_dropout, typo_rate
        self.seg = Segmenter(tok)
        self.rng = np.random.default_rng([seed, 12])
        self.special = np.zeros(tok.vocab_size, dtype=bool)
        self.special[list(tok.specials.values())] = True
        # How much of the text each id covers: its bytes; a special token counts as one unit.
        self.units = np.maximum(np.array(tok.token_byte_lengths(), dtype=np.int64), self.special)
        self.pad = getattr(inner, "pad", max(tok.eot_id, 0))  # the fine-tuning sampler pads with <|pad|>

    @property
    def n_windows(self) -> int:
        return self.inner.n_windows

    @property
    def epochs_done(self) -> float:
        return self.inner.epochs_done

    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), "robust": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
        self.rng.bit_generator.state = state["robust"]

    def next(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.inner.next(batch)
        rows, targeted = [], []
        for xr, yr in zip(x.numpy(), y.numpy()):
            has = np.flatnonzero(yr >= 0)
            n = int(has[-1]) + 1 if len(has) else 1  # positions before the padding
            rows.append(np.append(xr[:n], max(int(yr[n - 1]), 0)).astype(np.int64))  # the ids: inputs + the last target
            targeted.append(np.concatenate([[False], yr[:n] >= 0]))  # targeted[i]: ids[i] is predicted
        return self.augment(rows, targeted)

    def augment(self, rows: list[np.ndarray], targeted: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, T <= block) for rows of deterministic ids and which of them are targets."""
        parts = self._parts(rows, targeted)
        ids, bound, aligned = self._resegment(rows, parts)
        # Per row: the inputs, where each ends in the clean text (in units), the target there, and
        # which inputs are typo-free pieces of a misspelled word (the targets where no clean token begins).
        # where each clean id begins; then the end
        starts = [np.concatenate([[0], np.cumsum(self.units[row])]) for row in rows]
        xs: list[list[np.ndarray]] = [[] for _ in rows]
        ends: list[list[np.ndarray]] = [[] for _ in rows]
        word_piece: list[list[np.ndarray]] = [[] for _ in rows]
        for k, (r, a, b, changed) in enumerate(parts):
            got = ids[bound[k] : bound[k + 1]] if changed else rows[r][a:b]
            e = np.cumsum(self.units[got])
            al = aligned[k]
            # Word pieces are targets in pre-training only: in fine-tuning the changed text carries no loss.
            word_piece[r].append(
                self._word_pieces(e - self.units[got], e, al)
                if al is not None and not self.context_only
                else np.zeros(len(got), dtype=bool)
            )
            if al is not None:
                e = al.offsets[e]
            xs[r].append(got)
            ends[r].append(np.where(e >= 0, e + starts[r][a], -1))
        width = min(self.block, max(sum(map(len, x)) for x in xs))
        X = np.full((len(rows), width), self.pad, dtype=np.int64)
        Y = np.full((len(rows), width), -1, dtype=np.int64)
        for r, row in enumerate(rows):
            x, e = np.concatenate(xs[r]), np.concatenate(ends[r])[:width]
            # piece[i]: x[i + 1] is a typo-free piece
            piece = np.append(np.concatenate(word_piece[r])[1:], False)[:width]
            at = np.minimum(np.searchsorted(starts[r][:-1], e), len(row) - 1)
            hit = (e >= 0) & (starts[r][at] == e) & (e < starts[r][-1]) & targeted[r][at]
            nxt = np.append(x[1:], 0)[:width]
            x = x[:width]
            X[r, : len(x)] = x
            Y[r, : len(x)] = np.where(hit, row[at], np.where(piece, nxt, -1))
        return torch.from_numpy(X), torch.from_numpy(Y)

    def _parts(self, rows: list[np.ndarray], targeted: list[np.ndarray]) -> list[tuple[int, int, int, bool]]:
        """Every row cut into parts: runs of ordinary tokens (text) and single special tokens, each as
        (row, first token, end token, changed: whether its text is augmented)."""
        parts = []
        for r, row in enumerate(rows):
            start = 0
            for c in [*np.flatnonzero(self.special[row]).tolist(), len(row)]:
                if c > start:
                    parts.append((r, start, c, not (self.context_only and targeted[r][start:c].any())))
                if c < len(row):
                    parts.append((r, c, c + 1, False))
                start = c + 1
        return parts

    def _resegment(
        self, rows: list[np.ndarray], parts: list[tuple[int, int, int, bool]]
    ) -> tuple[np.ndarray, np.ndarray, list[Alignment | None]]:
        """The parts that change: typos, then pre-tokens, all re-segmented together. Returns the new ids,
        their bounds (part k's new ids are ids[bound[k]:bound[k + 1]]) and each part's typo alignment."""
        words: list[bytes] = []
        aligned: list[Alignment | None] = []  # for each part with typos
        n_words = []
        for r, a, b, changed in parts:
            if not changed:
                aligned.append(None)
                n_words.append(0)
                continue
            clean = b"".join([self.tok.pieces[i] for i in rows[r][a:b].tolist()]).decode("utf-8", "surrogateescape")
            typos = (
                inject_typos(clean, self.rate, int(self.rng.integers(1 << 62)), TRAIN_TYPO_KINDS) if self.rate else None
            )
            noisy = typos.text if typos else clean
            pieces = [w.encode("utf-8", "surrogateescape") for w in PRE_TOKENS.findall(noisy)]
            words += pieces
            aligned.append(align_typos(clean, typos) if typos and typos.edits else None)
            n_words.append(len(pieces))
        ids, counts = self.seg.segment(words, self.p, self.rng)
        bound = np.concatenate([[0], np.cumsum(counts)])[np.concatenate([[0], np.cumsum(n_words)])]
        return ids, bound, aligned

    @staticmethod
    def _word_pieces(s: np.ndarray, t: np.ndarray, al: Alignment) -> np.ndarray:
        """Which tokens [s, t) (noisy byte offsets) lie inside a misspelled word and hold none of its typos:
        the rest of the word as it is spelled, which follows from what was typed, never a typo itself."""
        words, edits = al.words, al.edits
        inside = ((words[None, :, 0] <= s[:, None]) & (t[:, None] <= words[None, :, 1])).any(1)
        typo = ((s[:, None] < edits[None, :, 1]) & (t[:, None] > edits[None, :, 0])).any(1)
        return inside & ~typo


# ---- where the typo penalty goes: word by word ---------------------------------------------------------------
