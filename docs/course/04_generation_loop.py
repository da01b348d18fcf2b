"""Chapter 4, vectors back to tokens and the generation loop: the model's last vector becomes one score per token
(logits), softmax turns the scores into probabilities, a rule picks a token, and the loop appends it and asks
again. Written by hand here, then checked against gradlm's engine; and what the temperature does to the choice."""

import math

import torch
from _common import args, plt

from gradlm import SamplingConfig, generate_text
from gradlm.model.transformer import ModelConfig, Transformer
from gradlm.text.datasets import resolve
from gradlm.text.tokenizer import Tokenizer

a = args(__doc__)
text = resolve("shakespeare").read_text(encoding="utf-8")[:100_000]
tok = Tokenizer.train([text], 300)
torch.manual_seed(0)
model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, block_size=64))
model.reset_parameters(seed=0)
with torch.no_grad():
    for p in model.parameters():
        p.mul_(3.0)  # an untrained model with opinions: its choices are clear, not near-ties
model.eval()

# The loop by hand: vectors -> logits -> probabilities -> the likeliest token -> append -> again
prompt, n = "ROMEO:", 20
ids = tok.encode(prompt)
with torch.no_grad():
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1, : tok.vocab_size]  # one score per token of the vocabulary
        probs = torch.softmax(logits, -1)  # scores -> probabilities that sum to 1
        ids.append(int(probs.argmax()))  # greedy: the likeliest
by_hand = tok.decode(ids[len(tok.encode(prompt)) :])
engine = generate_text(model, tok, prompt, SamplingConfig(temperature=0, max_new_tokens=n))
print(f"by hand: {by_hand!r}\nengine:  {engine!r}")

# The temperature divides the scores before the softmax: below 1 it sharpens the choice, above 1 it flattens it
with torch.no_grad():
    logits = model(torch.tensor([tok.encode(prompt)]))[0, -1, : tok.vocab_size]
temps = [0.25, 0.5, 1.0, 2.0] if a.tiny else [0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0]
entropy = {}
pyplot = plt()
fig, (ax1, ax2) = pyplot.subplots(1, 2, figsize=(11, 4))
order = logits.argsort(descending=True)[:20]
for t in temps:
    p = torch.softmax(logits / t, -1)
    entropy[t] = float(-(p * p.clamp_min(1e-12).log()).sum()) / math.log(2)
    ax1.plot(range(20), p[order].tolist(), marker=".", label=f"temperature {t}")
ax1.set(xlabel="the 20 likeliest tokens, in order", ylabel="probability", title="What the temperature does")
ax1.legend()
ax2.plot(temps, list(entropy.values()), marker="o")
ax2.axhline(math.log2(tok.vocab_size), color="grey", ls=":", label=f"uniform: log2 {tok.vocab_size}")
ax2.set(xscale="log", xlabel="temperature", ylabel="entropy of the choice (bits)", title="How open the choice is")
ax2.legend()
fig.savefig(f"{a.out}/04_generation.png", dpi=110, bbox_inches="tight")
print(f"check: the hand loop and the engine agree: {by_hand == engine}")
print("check: entropy in bits at temperature " + ", ".join(f"{t}: {e:.2f}" for t, e in entropy.items()))
