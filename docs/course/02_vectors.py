"""Chapter 2, tokens to vectors: each token id picks one row of the embedding matrix, a vector the model learns.
Before training the rows are random and no token is near another; after, tokens used alike have moved close
together. The script trains a small model and compares each token's nearest neighbour before and after."""

import shutil

import torch
import torch.nn.functional as F
from _common import args, plt, small_run

from gradlm.evaluation.inspection import neighbors
from gradlm.evaluation.landscape import initial_weights  # the weights training started from
from gradlm.model.transformer import ModelConfig
from gradlm.rundir import RunDir, load_model

a = args(__doc__)
run, _ = small_run(a.tiny, ModelConfig(n_layer=2, d_model=64, n_head=4, block_size=64), max_steps=600)
model, tok = load_model(run)
start = RunDir(run)


def nearest_cosine(weight: torch.Tensor) -> float:
    """The mean, over the tokens, of the cosine similarity to each one's nearest other token."""
    e = F.normalize(weight[: tok.vocab_size].float(), dim=-1)
    sims = e @ e.T
    sims.fill_diagonal_(-2)
    return float(sims.max(1).values.mean())


before = nearest_cosine(initial_weights(start)["embed_tokens.weight"])
after = nearest_cosine(model.embed_tokens.weight.detach())
words = [
    w for w in (" king", " queen", " lord", " he", " she", " my", " thy", " your", ",", ".") if len(tok.encode(w)) == 1
]
for w in words[:5]:
    (row,) = neighbors(model, tok, w, k=3)
    print(f"nearest to {row['token']}: " + ", ".join(f"{n['text']} {n['cosine']:.2f}" for n in row["nearest"]))

# The embeddings of a few tokens, flattened to two dimensions (their two main directions, PCA)
ids = [tok.encode(w)[0] for w in words]
e = model.embed_tokens.weight.detach()[ids].float()
e = e - e.mean(0)
_, _, v = torch.linalg.svd(e, full_matrices=False)
xy = e @ v[:2].T
pyplot = plt()
fig, ax = pyplot.subplots(figsize=(5.5, 4.5))
ax.scatter(xy[:, 0], xy[:, 1])
for (x, y), w in zip(xy.tolist(), words):
    ax.annotate(repr(w), (x, y), textcoords="offset points", xytext=(4, 4))
ax.set(title="Token vectors after training (2 main directions)", xticks=[], yticks=[])
fig.savefig(f"{a.out}/02_vectors.png", dpi=110, bbox_inches="tight")
print(f"check: mean cosine to the nearest other token: {before:.3f} before training, {after:.3f} after")
shutil.rmtree(run.parent)  # the temporary folder small_run trained in
