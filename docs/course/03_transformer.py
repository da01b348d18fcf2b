"""Chapter 3, the transformer: each layer lets every position read the earlier ones (attention) and then transforms
what it read (the MLP). The script trains a small model and looks at its attention: which heads read the token just
before (a "previous-token head", one of the first things a language model learns), and what each layer would
predict if it were the last (the logit lens)."""

import shutil

import torch
from _common import args, small_run

from gradlm.evaluation.inspection import inspect_text
from gradlm.model.transformer import ModelConfig
from gradlm.plots import plot_attention
from gradlm.rundir import load_model

a = args(__doc__)
run, _ = small_run(a.tiny, ModelConfig(n_layer=3, d_model=64, n_head=4, block_size=64), max_steps=600)
model, tok = load_model(run)

text = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
views = inspect_text(model, tok, text, lens=True)
att = torch.tensor(views["attention"])  # (layers, heads, T, T)
T = att.shape[-1]
previous = att.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1)  # mean attention each head pays to the token before
uniform = float(sum(1 / (i + 1) for i in range(1, T)) / (T - 1))  # what a head that reads evenly would pay it
layer, head = divmod(int(previous.argmax()), previous.shape[1])
plot_attention(views["attention"], views["tokens"], f"{a.out}/03_attention.png")
plot_attention(views["attention"], views["tokens"], f"{a.out}/03_previous_token_head.png", layer=layer, head=head)
for li, row in enumerate(previous.tolist()):
    print(f"layer {li}: attention to the previous token by head: " + "  ".join(f"{x:.2f}" for x in row))
last = [c["text"] for c in views["lens"][-1]]
first = [c["text"] for c in views["lens"][0]]
agree = sum(x == y for x, y in zip(first, last)) / len(last)
print(f"check: the strongest previous-token head is layer {layer}, head {head}: {float(previous.max()):.2f} "
      f"of its attention on the token before, against {uniform:.2f} for a head that reads evenly")  # fmt: skip
print(f"check: the first layer's guess already equals the output's at {agree:.0%} of the positions")
shutil.rmtree(run.parent)  # the temporary folder small_run trained in
