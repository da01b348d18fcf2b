"""Typos: the one generator of misspellings that evaluation (`gradlm eval --typos`, the drug QA's misspelled
split) and training augmentation (gradlm/text/augment.py) both use.

inject_typos(text, rate)  gives each letter of a text `rate` chance of one typo (swap, drop, insert, substitute)
                          and records each edit, so the clean and noisy texts can be lined up afterwards;
misspell(word, rng)       one slip a typist makes in one word (drop, swap, double, a neighbouring key).
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

import numpy as np

from gradlm.errors import ConfigError


class Typos(NamedTuple):
    text: str
    edits: int  # typos made
    letters: int  # letters in the original text (each had `rate` chance of one typo)
    # each typo, in order: (index in the original, characters replaced, what was written)
    at: tuple[tuple[int, int, str], ...] = ()


TYPO_KINDS = ("swap", "drop", "insert", "substitute")  # inject_typos' mix
NAME_TYPO_KINDS = ("drop", "swap", "double", "near_key")  # slips a typist makes in one word (misspell)
_KEYBOARD = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def near_keys(c: str) -> str:
    """The letters next to c on a QWERTY keyboard (same row and the rows above and below), in c's case."""
    rows = [row.find(c.lower()) for row in _KEYBOARD]
    if all(col < 0 for col in rows):
        return ""
    r = next(k for k, col in enumerate(rows) if col >= 0)
    col = rows[r]
    near = _KEYBOARD[r][max(col - 1, 0) : col + 2].replace(c.lower(), "")
    # A row is shifted about half a key right of the one above it, so the keys touching c there sit at
    # columns col and col + 1 above, and col - 1 and col below.
    if r > 0:
        near += _KEYBOARD[r - 1][col : col + 2]
    if r < 2:
        near += _KEYBOARD[r + 1][max(col - 1, 0) : col + 1]
    return near.upper() if c.isupper() else near


def _typo(text: str, i: int, kind: str, rng: random.Random, prev: str = "") -> tuple[str, int] | None:
    """One typo of `kind` on the letter text[i]: (what is written instead, how many characters of text it
    replaces), or None when that kind cannot happen here. prev is the character written just before, so
    a drop never empties a word.

        swap        the letter and the next one trade places ("ab" -> "ba")
        drop        the letter is left out
        insert      a random letter follows it
        double      the letter is typed twice
        near_key    a neighbouring key is hit instead (QWERTY)
        case        the letter is typed in the other case
        substitute  a random other letter is typed instead
    """
    c = text[i]
    nxt = text[i + 1] if i + 1 < len(text) else ""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c.isupper() else "abcdefghijklmnopqrstuvwxyz"
    if kind == "swap":
        return (nxt + c, 2) if nxt.isalpha() and nxt != c else None
    if kind == "drop":
        return ("", 1) if prev.isalpha() or nxt.isalpha() else None
    if kind == "insert":
        return c + rng.choice(alphabet), 1
    if kind == "double":
        return c + c, 1
    if kind == "near_key":
        keys = near_keys(c)
        return (rng.choice(keys), 1) if keys else None
    if kind == "case":
        other = c.swapcase()
        return (other, 1) if len(other) == 1 and other != c else None
    if kind == "substitute":
        return (rng.choice(alphabet.replace(c, "")) if c in alphabet else rng.choice(alphabet)), 1
    raise ConfigError(f"unknown typo kind {kind!r}; kinds are swap, drop, insert, double, near_key, case, substitute")


def inject_typos(text: str, rate: float, seed: int = 0, kinds: tuple[str, ...] = TYPO_KINDS) -> Typos:
    """A copy of text where each letter, with probability `rate`, gets one typo of a random kind from
    kinds (see _typo; by default: swapped with the next letter of its word, dropped, followed by an
    inserted random letter, or substituted by another). Only letters inside words change (spaces, digits
    and punctuation never do, and no word vanishes); the same seed gives the same copy.

        >>> inject_typos("the quick brown fox", 0.2, seed=1).text
    """
    if not 0 <= rate <= 1:
        raise ConfigError(f"typo rate must be in [0, 1], got {rate}")
    rng = random.Random(seed)
    letters = _letters(text)
    out: list[str] = []
    at: list[tuple[int, int, str]] = []
    done = 0  # text[:done] is written
    last = ""  # the last character written
    k = -1
    while rate > 0:
        # The next letter to get a typo: each letter has chance `rate`, so the letters skipped before it
        # are geometrically distributed (drawing that gap is much faster than one draw per letter).
        k += 1 + (int(math.log(1.0 - rng.random()) / math.log(1.0 - rate)) if rate < 1 else 0)
        if k >= len(letters):
            break
        i = letters[k]
        if i < done:  # the second letter of a swap: already written
            continue
        if i > done:
            out.append(text[done:i])
            last = text[i - 1]
        # A typo that cannot happen here (a swap at a word's end, ...) becomes a substitution.
        written, used = _typo(text, i, rng.choice(kinds), rng, last) or _typo(text, i, "substitute", rng)
        if written:
            out.append(written)
            last = written[-1]
        done = i + used
        at.append((i, used, written))
    out.append(text[done:])
    return Typos("".join(out), len(at), len(letters), tuple(at))


_ASCII_LETTER = np.array([chr(b).isalpha() for b in range(128)])


def _letters(text: str) -> list[int]:
    """Indices of the letters (str.isalpha) of text."""
    if text.isascii():  # the common case, ~50x faster
        return np.flatnonzero(_ASCII_LETTER[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]).tolist()
    return [i for i, c in enumerate(text) if c.isalpha()]


def misspell(word: str, rng: random.Random, kinds: tuple[str, ...] = NAME_TYPO_KINDS) -> tuple[str, str]:
    """word with exactly one typo (a random kind from kinds, at a random letter) and that kind; the result
    always differs from word. The typos of inject_typos, one at a time, for rare words such as drug names.

        >>> misspell("zorvastatin", random.Random(0))
    """
    letters = [i for i, c in enumerate(word) if c.isalpha()]
    if len(letters) < 2:
        raise ConfigError(f"cannot misspell {word!r}: it needs at least two letters")
    for _ in range(1000):
        kind, i = rng.choice(kinds), rng.choice(letters)
        edit = _typo(word, i, kind, rng, word[i - 1] if i else "")
        if edit is not None:
            new = word[:i] + edit[0] + word[i + edit[1] :]
            if new != word:
                return new, kind
    raise ConfigError(f"no typo of the kinds {', '.join(kinds)} changes {word!r}")
