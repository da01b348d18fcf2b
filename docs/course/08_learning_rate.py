"""Chapter 8, the learning rate and convergence: on a quadratic cost, gradient descent converges for any learning
rate below 2 / (the largest curvature) and diverges above it; the largest curvature is the Hessian's largest
eigenvalue, which this script computes, so the bound is a number you can check."""

import torch
from _common import args, plt

a = args(__doc__)
torch.manual_seed(0)
x = torch.randn(200, 5) * torch.tensor([3.0, 1.0, 1.0, 0.5, 0.2])  # one direction much steeper than the others
y = x @ torch.randn(5) + 0.1 * torch.randn(200)
hessian = x.T @ x / len(x)  # the cost 1/(2n) |x w - y|^2 has this Hessian everywhere
top = float(torch.linalg.eigvalsh(hessian).max())
steps = 40 if a.tiny else 100


def run(lr: float) -> list[float]:
    w, out = torch.zeros(5), []
    for _ in range(steps):
        r = x @ w - y
        out.append(float(0.5 * (r @ r) / len(x)))
        w = w - lr * (x.T @ r) / len(x)
    return out


p = plt()
fig, ax = p.subplots(figsize=(6.5, 4))
result = {}
for k in (0.1, 1.0, 1.9, 2.1):
    costs = run(k / top)
    result[k] = (costs[0], costs[-1])
    ax.plot(costs, label=f"lr = {k} / curvature")
ax.set(
    yscale="log", xlabel="step", ylabel="cost", title=f"Largest curvature {top:.2f}: converges below lr {2 / top:.3f}"
)
ax.legend()
fig.savefig(f"{a.out}/08_learning_rate.png", dpi=110, bbox_inches="tight")
print(f"check: the largest curvature is {top:.3f}, so learning rates above {2 / top:.4f} diverge")
for k, (c0, c) in result.items():
    print(f"check: lr {k} / curvature = {k / top:.4f}: final cost {c:.3g} ({'diverged' if c > c0 else 'falling'})")
