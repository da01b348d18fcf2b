"""Chapter 13, answering questions about prescription drugs, misspelled names included: a base model reads the
(invented) drug facts of examples/drugqa, is fine-tuned on questions about them, and answers by exact match. A drug
name with one typo splits into other tokens, and accuracy falls; fine-tuning on questions with typos in them
(--typo-rate) takes much of that loss back."""

import json
import shutil
import tempfile
from pathlib import Path
from statistics import mean

from _common import args, plt

from gradlm import FinetuneConfig, ModelConfig, TrainConfig, finetune, load_model, train
from gradlm.evaluation.evaluate import load_qa, score_qa
from gradlm.text.tokenizer import show_token

a = args(__doc__)
qa = Path(__file__).resolve().parents[2] / "examples" / "drugqa"
work = Path(tempfile.mkdtemp(prefix="gradlm-course-"))

# 1. A base model that has read the facts as prose, with a 512-token tokenizer trained on them
train(ModelConfig(n_layer=2, d_model=64 if a.tiny else 128, n_head=4, block_size=128),
      TrainConfig(data=str(qa / "facts.txt"), out=str(work / "base"), vocab_size=512, batch=16, lr=3e-3,
                  max_steps=20 if a.tiny else 300, eval_every=100, progress=False, plots=False, seed=1337))  # fmt: skip

# 2. How a drug name splits in that tokenizer, spelled right and with the one typo of misspelled.jsonl
_, tok = load_model(work / "base")
typos = [json.loads(line) for line in open(qa / "misspelled.jsonl", encoding="utf-8")]
pieces = lambda word: [show_token(tok, i) for i in tok.encode(" " + word)]  # noqa: E731  (after a space, as in a question)
for t in typos[:12:3]:  # four drugs, four kinds of typo
    print(f"{t['drug']:>14} -> {' '.join(pieces(t['drug'])):<28} {t['misspelled']:>14} ({t['typo']}) -> "
          f"{' '.join(pieces(t['misspelled']))}")  # fmt: skip
clean, slipped = mean(len(pieces(t["drug"])) for t in typos), mean(len(pieces(t["misspelled"])) for t in typos)
changed = mean(not set(pieces(t["drug"])) >= set(pieces(t["misspelled"])) for t in typos)

# 3. Fine-tune every weight on the 720 training questions, as they are and with typos in 5% of their letters
items = load_qa([str(qa / f"{split}.jsonl") for split in ("train", "heldout", "misspelled")])
items = items[::20] if a.tiny else items
acc = {}
for rate in (0.0, 0.05):
    out = work / f"qa-typos{rate}"
    cfg = TrainConfig(data=str(qa / "train.jsonl"), out=str(out), lr=1e-3, max_epochs=0.2 if a.tiny else 10,
                      batch=32, val_fraction=0.05, warmup_steps=10, eval_every=50, typo_rate=rate, progress=False,
                      plots=False, seed=1337)  # fmt: skip
    finetune(str(work / "base"), cfg, FinetuneConfig(method="full"))
    model, tok = load_model(out)
    acc[rate] = {name: s["accuracy"] for name, s in score_qa(model, tok, items, batch=64).splits.items()}
shutil.rmtree(work)

splits = {"train": "training phrasings", "misspelled": "the same, one typo\nin the drug's name",
          "heldout": "new phrasings"}  # fmt: skip
pyplot = plt()
fig, ax = pyplot.subplots(figsize=(6.5, 4))
for k, rate in enumerate(acc):
    xs = [i + 0.4 * k - 0.2 for i in range(len(splits))]
    label = f"fine-tuned with typo rate {rate}" if rate else "plain fine-tuning"
    bars = ax.bar(xs, [acc[rate][s] for s in splits], 0.4, label=label)
    ax.bar_label(bars, fmt="%.2f")
ax.set_xticks(range(len(splits)), list(splits.values()))
ax.set(ylim=(0, 1.1), ylabel="exact-match accuracy", title="Questions about 80 invented drugs")
ax.legend(loc="upper right")
fig.savefig(f"{a.out}/13_drug_qa.png", dpi=110, bbox_inches="tight")
print(f"check: tokens per drug name: {clean:.2f} spelled right, {slipped:.2f} with one typo; in {changed:.0%} of the "
      "names the typo brings a token the right spelling does not have")  # fmt: skip
for rate, got in acc.items():
    print(f"check: fine-tuned with typo rate {rate}: exact match " + ", ".join(f"{s} {got[s]:.3f}" for s in splits))
