"""Chapter 10, sensitivity to hyperparameters: train the same small model on Shakespeare with a grid of learning rates
and two batch sizes, every run on the same number of tokens, and compare the final validation losses. The learning
rate moves the loss most, and its best value depends on the batch size."""

import shutil

from _common import args, plt, small_run

from gradlm import ModelConfig

a = args(__doc__)
shape = dict(n_layer=2, d_model=64, n_head=4, block_size=64)
tokens = 300_000  # every run reads as many tokens: steps = tokens / (batch x 64)
lrs = [2e-3, 8e-3] if a.tiny else [1e-3 * 2**k for k in range(6)]  # 1e-3 to 3.2e-2, each twice the last
batches = [4, 16] if a.tiny else [8, 32]
loss, steps, guarded = {}, {}, []
for b in batches:
    for lr in lrs:
        run, summary = small_run(a.tiny, ModelConfig(**shape), max_steps=tokens // (b * 64), vocab_size=512,
                                 eval_tokens=16384, lr=lr, batch=b, warmup_steps=10, eval_every=10**6)  # fmt: skip
        loss[b, lr], steps[b] = summary["val_loss"], summary["steps"]
        if summary["divergence_restarts"]:  # the loss exploded: the guard restored a checkpoint and halved the lr
            guarded.append((b, lr))
        shutil.rmtree(run.parent)

best = {b: min(lrs, key=lambda lr: loss[b, lr]) for b in batches}
worst = {b: max(loss[b, lr] for lr in lrs) for b in batches}
pyplot = plt()
fig, ax = pyplot.subplots(figsize=(6.5, 4))
for b in batches:
    print(f"batch {b}: " + ", ".join(f"lr {lr:g} {loss[b, lr]:.3f}" for lr in lrs))
    line = ax.plot(lrs, [loss[b, lr] for lr in lrs], "o-", label=f"batch {b} ({steps[b]} steps)")
    ax.plot([best[b]], [loss[b, best[b]]], "*", ms=16, color=line[0].get_color())
if guarded:
    ax.plot(*zip(*[(lr, loss[b, lr]) for b, lr in guarded]), "o", ms=14, mfc="none", color="red",
            label="exploded; the guard halved its lr")  # fmt: skip
ax.set(xscale="log", xlabel="peak learning rate (AdamW)", ylabel="validation loss after the run",
       title=f"d_model {shape['d_model']}: every run reads {tokens:,} tokens")  # fmt: skip
ax.legend()
fig.savefig(f"{a.out}/10_sensitivity.png", dpi=110, bbox_inches="tight")
print("the divergence guard stepped in at: " + (", ".join(f"batch {b} lr {lr:g}" for b, lr in guarded) or "none"))
small, large = batches
for b, other in ((small, large), (large, small)):
    print(f"check: batch {b}: best learning rate {best[b]:g} (loss {loss[b, best[b]]:.3f}); at batch {other}'s best, "
          f"{best[other]:g}: {loss[b, best[other]]:.3f}; the worst of the grid: {worst[b]:.3f}")  # fmt: skip
