"""Chapter 11, regularisation, bias and variance: fit polynomials of growing degree to a few noisy points. Too simple
a model misses the pattern (bias: high error everywhere); too flexible a one learns the noise (variance: low error
on the points it saw, high on new ones). A penalty on the weights (weight decay, the L2 of ridge regression) takes
flexibility back without changing the model."""

import torch
from _common import args, plt

a = args(__doc__)
g = torch.Generator().manual_seed(0)
n_train = 20 if a.tiny else 30


def data(n: int):
    x = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    return x, torch.sin(3 * x) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)


x, y = data(n_train)
xv, yv = data(500)  # held out: what the model never saw


def fit(degree: int, decay: float):
    """Least squares with an L2 penalty on the weights: the minimum of |X w - y|^2 / n + decay |w|^2."""
    X = torch.stack([x**k for k in range(degree + 1)], 1)
    w = torch.linalg.solve(X.T @ X / len(x) + decay * torch.eye(degree + 1, dtype=X.dtype), X.T @ y / len(x))
    err = lambda xs, ys: float(((torch.stack([xs**k for k in range(degree + 1)], 1) @ w - ys) ** 2).mean())  # noqa: E731
    return err(x, y), err(xv, yv)


degrees = list(range(1, 16))
plain = [fit(d, 0.0) for d in degrees]
ridge = [fit(d, 1e-3) for d in degrees]
pyplot = plt()
fig, ax = pyplot.subplots(figsize=(6.5, 4))
ax.plot(degrees, [t for t, _ in plain], "o-", label="training error")
ax.plot(degrees, [v for _, v in plain], "o-", label="held-out error")
ax.plot(degrees, [v for _, v in ridge], "s--", label="held-out error, weight decay 1e-3")
ax.axhline(0.09, color="grey", ls=":", label="the noise (0.3^2)")
ax.set(yscale="log", xlabel="polynomial degree (flexibility)", ylabel="mean squared error", title=f"{n_train} points")
ax.legend(fontsize=8)
fig.savefig(f"{a.out}/11_bias_variance.png", dpi=110, bbox_inches="tight")
best = min(degrees, key=lambda d: plain[d - 1][1])
print(f"check: degree 1 (bias): training {plain[0][0]:.3f}, held out {plain[0][1]:.3f}")
print(f"check: degree {best} (the best held out): training {plain[best - 1][0]:.3f}, held out {plain[best - 1][1]:.3f}")
print(
    f"check: degree 15 (variance): training {plain[-1][0]:.3f}, held out {plain[-1][1]:.3f}; "
    f"with weight decay {ridge[-1][1]:.3f}"
)
