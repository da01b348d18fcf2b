"""Chapter 14, measuring a model: loss, perplexity and bits per byte, what `gradlm eval` reports; why bits per byte
compare models whose tokenizers differ and the loss does not; the training text against held-out text; and how much
the measured number moves with the number of tokens it is measured on."""

import shutil

from _common import args, plt, small_run

from gradlm import ModelConfig, evaluate_text, load_model
from gradlm.evaluation.evaluate import EvalConfig, format_report, run_eval
from gradlm.text.datasets import resolve

a = args(__doc__)
text = resolve("shakespeare").read_text(encoding="utf-8")
train_text = text[: 20_000 if a.tiny else 100_000]  # the start: in the training split
held_out = text[-(20_000 if a.tiny else 100_000) :]  # the end: inside the last 10%, held out for validation

# Two models, the same shape and training: one reads bytes (256 ids), the other tokens of a 1024-id BPE tokenizer
vocabs = (256, 1024)
scores = {}
for vocab in vocabs:
    run, summary = small_run(a.tiny, ModelConfig(n_layer=2, d_model=64, n_head=4, block_size=64), max_steps=600,
                             vocab_size=vocab)  # fmt: skip
    model, tok = load_model(run)
    scores[vocab] = evaluate_text(model, tok, held_out, keep_nll=True)  # every held-out token, each scored once
    s = scores[vocab]
    print(f"vocabulary {vocab}: loss {s.loss:.3f} nats/token, perplexity {s.perplexity:.1f}, {s.bits_per_byte:.3f} "
          f"bits/byte ({s.tokens:,} tokens, {s.bytes / s.tokens:.2f} bytes a token)")  # fmt: skip
    if vocab == vocabs[1]:  # what gradlm eval prints, and the training text against the held-out text
        (run.parent / "held_out.txt").write_text(held_out, encoding="utf-8")
        print(format_report(run_eval(model, tok, EvalConfig(data=str(run.parent / "held_out.txt"), progress=False))))
        seen = evaluate_text(model, tok, train_text)
        trained_on = summary["val_loss"]
    shutil.rmtree(run.parent)

# The noise of a measurement: the held-out loss measured on n tokens, over many disjoint samples of n tokens each.
# A sample is n/64 windows of 64 tokens, one after the other (a slice of the text) or spread evenly over all of it.
s0, s1 = scores[vocabs[0]], scores[vocabs[1]]
windows = s1.nll[: len(s1.nll) // 64 * 64].view(-1, 64)
sizes = [64, 256, 1024] if a.tiny else [64, 256, 1024, 4096]
slices, spread = {}, {}
for n in sizes:
    k = n // 64  # windows per sample
    m = len(windows) // k  # samples
    slices[n] = windows[: k * m].view(m, k, 64).mean((1, 2))  # sample j: windows j*k ... j*k + k-1
    spread[n] = windows[: k * m].view(k, m, 64).mean((0, 2))  # sample j: windows j, j+m, j+2m, ...

pyplot = plt()
fig, (ax1, ax2) = pyplot.subplots(1, 2, figsize=(11, 4))
ax1.bar([0, 1], [s0.loss, s1.loss], 0.35, label="loss (nats per token)")
ax1.bar([0.35, 1.35], [s0.bits_per_byte, s1.bits_per_byte], 0.35, label="bits per byte")
ax1.set(xticks=[0.175, 1.175], xticklabels=[f"{v} ids" for v in vocabs], title="One text, two tokenizers")
ax1.legend()
for samples, label, shift in ((slices, "slices of the text", 0.95), (spread, "windows spread over it", 1.05)):
    ax2.errorbar([n * shift for n in sizes], [float(samples[n].mean()) for n in sizes],
                 [float(samples[n].std()) for n in sizes], fmt="o", capsize=4, label=label)  # fmt: skip
ax2.axhline(s1.loss, color="k", ls=":", label=f"all {s1.tokens:,} tokens")
ax2.set(xscale="log", xlabel="tokens measured on", ylabel="held-out loss (mean and standard deviation)",
        title="How much a measurement moves")  # fmt: skip
ax2.set_xticks(sizes, [str(n) for n in sizes])
ax2.minorticks_off()
ax2.legend(fontsize=8)
fig.savefig(f"{a.out}/14_measuring.png", dpi=110, bbox_inches="tight")

print(f"check: loss per token: {vocabs[0]} ids {s0.loss:.3f}, {vocabs[1]} ids {s1.loss:.3f}; bits per byte "
      f"{s0.bits_per_byte:.3f} and {s1.bits_per_byte:.3f}")  # fmt: skip
print(f"check: {vocabs[1]} ids: training text {seen.loss:.3f}, held-out text {s1.loss:.3f}; perplexity "
      f"{seen.perplexity:.1f} and {s1.perplexity:.1f}; the run's own validation loss (on 1,024 tokens) "
      f"{trained_on:.3f}")  # fmt: skip
for n in sizes:
    print(f"check: the loss on {n:>4} tokens moves by (standard deviation) {float(slices[n].std()):.3f} as a slice, "
          f"{float(spread[n].std()):.3f} spread ({len(slices[n])} samples)")  # fmt: skip
