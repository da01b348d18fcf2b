"""Chapter 12, transfer learning and fine-tuning: pretrain a small model on Shakespeare, then train it on a small,
different text (the invented drug facts of examples/drugqa, 13 KB) and compare with the same model trained on that
text from random weights. Same tokenizer, shape, data and settings: only the starting weights differ (and, for
--method freeze, which of them train)."""

import json
import shutil
from pathlib import Path

from _common import args, plt, small_run

from gradlm import FinetuneConfig, ModelConfig, Tokenizer, TrainConfig, finetune, train
from gradlm.text.prepare import prepare

a = args(__doc__)
shape = dict(n_layer=2, d_model=64, n_head=4, block_size=64)
base, pretrained = small_run(a.tiny, ModelConfig(**shape), max_steps=600, vocab_size=512)  # Shakespeare
work = base.parent

# The small dataset, in the pretrained model's tokenizer, so that every run reads the same tokens (gradlm prepare)
facts = Path(__file__).resolve().parents[2] / "examples" / "drugqa" / "facts.txt"
prepare(str(facts), Tokenizer.load(base / "tokenizer.json"), work / "facts", val_fraction=0.1, progress=False)

runs = {  # name: how the run starts and what trains
    "from scratch (random weights)": None,
    "pretrained, every weight trains": FinetuneConfig(method="full"),
    "pretrained, top block and head train": FinetuneConfig(method="freeze", train_top=1),
    "pretrained, only the head trains": FinetuneConfig(method="freeze", train_top=0),
}
curves = {}
for name, method in runs.items():
    cfg = TrainConfig(data=str(work / "facts"), out=str(work / f"run{len(curves)}"), max_steps=10 if a.tiny else 200,
                      batch=16, lr=3e-3, warmup_steps=10, eval_every=5 if a.tiny else 10, eval_tokens=4096,
                      progress=False, plots=False, sample_tokens=0, seed=0)  # fmt: skip
    train(ModelConfig(**shape), cfg) if method is None else finetune(str(base), cfg, method)
    rows = [json.loads(line) for line in open(Path(cfg.out) / "metrics.jsonl")]
    curves[name] = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]

pyplot = plt()
fig, ax = pyplot.subplots(figsize=(6.5, 4))
for name, curve in curves.items():
    ax.plot(*zip(*curve), "-" if name.startswith("pretrained") else "k--", label=name)
ax.set(yscale="log", xlabel="step (16 windows of 64 tokens)", ylabel="validation loss on the drug facts",
       title="Fine-tuning a Shakespeare model vs training from scratch")  # fmt: skip
ax.set_yticks([0.4, 0.6, 1, 2, 4], ["0.4", "0.6", "1", "2", "4"], minor=False)
ax.minorticks_off()
ax.legend(fontsize=8)
fig.savefig(f"{a.out}/12_fine_tuning.png", dpi=110, bbox_inches="tight")
scratch, full = curves["from scratch (random weights)"], curves["pretrained, every weight trains"]
print(f"check: Shakespeare validation loss of the pretrained model {pretrained['val_loss']:.3f}")
print(f"check: after {full[0][0]} steps on the facts: pretrained {full[0][1]:.3f}, from scratch {scratch[0][1]:.3f}")
for name, curve in curves.items():
    step, low = min(curve, key=lambda p: p[1])
    print(f"check: {name}: lowest validation loss {low:.3f} at step {step}")
target = min(v for _, v in scratch)
first = next((s for s, v in full if v <= target), None)
print(f"check: the pretrained model reaches the scratch model's best ({target:.3f}) at step {first}")
shutil.rmtree(work)
