"""Chapter 6, gradient descent by hand: the five steps (predict, measure the cost, take its gradient, step against
it, repeat) on a model small enough to follow, the gradient written out and checked against autograd; then one
step of the language model by hand, checked against torch's SGD."""

import math

import torch
from _common import args, plt

from gradlm.model.transformer import ModelConfig, Transformer

a = args(__doc__)
torch.manual_seed(0)

# A model small enough to follow: the next character is "a" or "b" with probability sigmoid(w x + b)
x = torch.randn(64)
y = (x + 0.3 * torch.randn(64) > 0).float()  # 1: "a" follows, 0: "b"
w, b, lr = 0.0, 0.0, 0.5
steps = 20 if a.tiny else 60
losses, worst = [], 0.0
for step in range(steps):
    p = torch.sigmoid(w * x + b)  # 1. predict
    cost = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()  # 2. the cost: cross-entropy
    gw, gb = ((p - y) * x).mean(), (p - y).mean()  # 3. its gradient, by hand: dcost/dw, dcost/db
    wt, bt = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    pt = torch.sigmoid(wt * x + bt)
    (-(y * torch.log(pt) + (1 - y) * torch.log(1 - pt)).mean()).backward()  # ... and by autograd
    worst = max(worst, abs(float(gw) - float(wt.grad)), abs(float(gb) - float(bt.grad)))
    w, b = w - lr * float(gw), b - lr * float(gb)  # 4. step against the gradient
    losses.append(float(cost))  # 5. repeat
print(
    f"after {steps} steps: w {w:.3f}, b {b:.3f}, cost {losses[-1]:.4f} "
    f"(from {losses[0]:.4f} = ln 2 = {math.log(2):.4f})"
)

# The same update on the language model: theta <- theta - lr * gradient, by hand, equals torch's SGD
cfg = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, block_size=16)
model = Transformer(cfg)
model.reset_parameters(seed=0)
ids = torch.randint(0, 64, (4, 17))
model(ids[:, :-1], ids[:, 1:]).backward()
by_hand = [p.detach() - 0.1 * p.grad for p in model.parameters()]
torch.optim.SGD(model.parameters(), lr=0.1).step()
same = max(float((p.detach() - q).abs().max()) for p, q in zip(model.parameters(), by_hand))

p = plt()
fig, ax = p.subplots(figsize=(6, 4))
ax.plot(range(steps), losses, marker=".")
ax.set(xlabel="step", ylabel="cost (cross-entropy, nats)", title=f"Gradient descent by hand, lr {lr}")
fig.savefig(f"{a.out}/06_gradient_descent.png", dpi=110, bbox_inches="tight")
print(f"check: largest difference between the hand gradient and autograd: {worst:.1e}")
print(f"check: largest difference between the hand step and torch.optim.SGD on the language model: {same:.1e}")
