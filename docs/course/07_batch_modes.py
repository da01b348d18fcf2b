"""Chapter 7, batch, stochastic and mini-batch gradient descent: the same model and data, one update per pass over
all the examples (batch), per example (stochastic) or per 32 (mini-batch), compared per example seen."""

import torch
from _common import args, plt

a = args(__doc__)
torch.manual_seed(0)
n, epochs = (256, 6) if a.tiny else (1024, 10)
x = torch.randn(n, 8)
y = (x @ torch.randn(8) + 0.5 * torch.randn(n) > 0).float()


def cost(w):
    return float(torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y))


def descend(batch: int, lr: float) -> tuple[list[int], list[float]]:
    """Gradient descent with this many examples per update; the cost on all the data after each update."""
    w, seen, costs, g = torch.zeros(8), [], [], torch.Generator().manual_seed(1)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            rows = order[i : i + batch]
            p = torch.sigmoid(x[rows] @ w)
            w = w - lr * x[rows].T @ (p - y[rows]) / len(rows)  # the gradient of the mean cost over the batch
            seen.append((seen[-1] if seen else 0) + len(rows))
            costs.append(cost(w))
    return seen, costs


p = plt()
fig, ax = p.subplots(figsize=(6.5, 4))
final = {}
for name, batch, lr in (("batch (all)", n, 0.5), ("mini-batch (32)", 32, 0.5), ("stochastic (1)", 1, 0.5)):
    seen, costs = descend(batch, lr)
    ax.plot([s / n for s in seen], costs, label=f"{name}: {len(costs)} updates", lw=1)
    tail = torch.tensor(costs[-max(1, len(costs) // 10) :])
    final[name] = (costs[-1], float(tail.std()) if len(tail) > 1 else 0.0)
ax.set(xlabel="epochs (passes over the data)", ylabel="cost on all the data", title="One model, three batch modes")
ax.legend()
fig.savefig(f"{a.out}/07_batch_modes.png", dpi=110, bbox_inches="tight")
for name, (c, s) in final.items():
    print(f"check: {name}: final cost {c:.4f}, its wobble over the last tenth of the updates (std) {s:.4f}")
