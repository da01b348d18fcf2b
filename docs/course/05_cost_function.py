"""Chapter 5, the cost function: cross-entropy is minus the log of the probability the model gave the token that
really came next. A model that knows nothing spreads its probability evenly and pays ln(vocabulary size) per token;
a perfect one pays 0; bits per byte divide the cost by ln 2 and by the bytes a token stands for."""

import math

import torch
import torch.nn.functional as F
from _common import args, plt

from gradlm.model.transformer import ModelConfig, Transformer
from gradlm.text.datasets import resolve
from gradlm.text.tokenizer import Tokenizer

a = args(__doc__)

# One prediction over a 5-token vocabulary; the token that really came next is number 2
actual = 2
for name, probs in (("unsure", [0.2, 0.2, 0.2, 0.2, 0.2]), ("right", [0.05, 0.05, 0.8, 0.05, 0.05]),
                    ("wrong", [0.8, 0.05, 0.05, 0.05, 0.05])):  # fmt: skip
    p = torch.tensor(probs)
    by_hand = -math.log(probs[actual])
    torch_ce = float(F.cross_entropy(p.log()[None], torch.tensor([actual])))
    print(f"{name:>7}: p(actual) = {probs[actual]:.2f}, cost -ln p = {by_hand:.3f} (torch: {torch_ce:.3f})")

# A model that knows nothing pays about ln V on every token
vocab = 256 if a.tiny else 1024
model = Transformer(ModelConfig(vocab_size=vocab, n_layer=2, d_model=64, n_head=4, block_size=64))
model.reset_parameters(seed=0)
ids = torch.randint(0, vocab, (8, 65), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    untrained = float(model(ids[:, :-1], ids[:, 1:]))

pyplot = plt()
fig, ax = pyplot.subplots(figsize=(6, 4))
ps = torch.linspace(0.001, 1, 400)
ax.plot(ps, -ps.log())
ax.set(xlabel="probability the model gave the token that came", ylabel="cost: -ln p (nats)", title="Cross-entropy")
for p_, label in ((1 / vocab, f"uniform over {vocab}"), (0.5, "a coin toss"), (1.0, "certain and right")):
    ax.annotate(
        label,
        xy=(p_, -math.log(p_)),
        xytext=(max(p_, 0.05) + 0.05, -math.log(p_) + 0.6),
        arrowprops={"arrowstyle": "->"},
    )
fig.savefig(f"{a.out}/05_cost.png", dpi=110, bbox_inches="tight")
print(f"check: an untrained model's cost {untrained:.3f} against ln {vocab} = {math.log(vocab):.3f}")
text = resolve("shakespeare").read_text(encoding="utf-8")[: 100_000 if a.tiny else None]
per_token = len(text.encode("utf-8")) / len(Tokenizer.train([text], vocab).encode(text))  # bytes a token stands for
bits = untrained / math.log(2)
print(
    f"check: {bits:.2f} bits per token; a {vocab}-token vocabulary spends {per_token:.2f} bytes of Shakespeare "
    "a token, "
    f"so {bits / per_token:.2f} bits per byte"
)
