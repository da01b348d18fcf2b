"""Chapter 1, text to tokens: train a byte-level BPE tokenizer on Shakespeare and count the pieces that clean and
misspelled drug names split into, at three vocabulary sizes."""

import random

from _common import args, plt

from gradlm.text.datasets import resolve
from gradlm.text.tokenizer import Tokenizer, show_token
from gradlm.text.typos import misspell

a = args(__doc__)
text = resolve("shakespeare").read_text(encoding="utf-8")[: 200_000 if a.tiny else None]
words = ["acetaminophen", "ibuprofen", "amoxicillin", "metformin", "atorvastatin", "lisinopril", "king", "love"]
rng = random.Random(0)
typos = {w: misspell(w, rng)[0] for w in words}  # one slip each: a dropped, swapped, doubled or near-key letter

sizes = [300, 1000] if a.tiny else [300, 1000, 4000]
clean, noisy = [], []
for vocab in sizes:
    tok = Tokenizer.train([text], vocab)
    pieces = {w: tok.encode(" " + w) for w in words}
    slipped = {w: tok.encode(" " + typos[w]) for w in words}
    clean.append(sum(map(len, pieces.values())) / len(words))
    noisy.append(sum(map(len, slipped.values())) / len(words))
    assert all(tok.decode(tok.encode(" " + t)) == " " + t for t in typos.values())  # lossless, whatever the input
    print(f"vocabulary {vocab}: {clean[-1]:.2f} tokens per clean word, {noisy[-1]:.2f} per misspelled one")
    for w in words[:3]:
        split = lambda ids: " ".join(show_token(tok, i) for i in ids)  # noqa: E731
        print(f"  {w:>14} -> {split(pieces[w]):<40} {typos[w]:>14} -> {split(slipped[w])}")

p = plt()
fig, ax = p.subplots(figsize=(6, 4))
ax.plot(sizes, clean, marker="o", label="clean words")
ax.plot(sizes, noisy, marker="o", label="one typo each")
ax.set(
    xscale="log", xlabel="vocabulary size", ylabel="tokens per word", title="How words split as the vocabulary grows"
)
ax.legend()
fig.savefig(f"{a.out}/01_tokens.png", dpi=110, bbox_inches="tight")
print(f"check: tokens per word at vocabulary {sizes[-1]}: clean {clean[-1]:.2f}, misspelled {noisy[-1]:.2f}")
