"""Typo robustness on Shakespeare: plain training against BPE-dropout, typo augmentation and both.

Each configuration trains the demo model from the same initialisation and data order, for the same
wall time. The machine is shared, so wall time is not raced but computed: the step time of every
configuration (its sampler included) is measured first, alternating between them in this process, and
each gets steps = plain steps x plain step time / its step time. Then each model is scored on the
validation text, clean and with typos (gradlm eval --typos: the same rate and seed for all), and the
typo penalty (noisy bits/byte - clean bits/byte) is compared with plain training's.

    python
                                                      benchmarks/robustness.py                   # --steps 300
                                                      --bpe-dropout 0.1 --typo-rate 0.05 --typos 0.05 --threads 1
    python benchmarks/robustness.py --steps 600 --jobs 2   # twice the training, two configurations at a time
    python benchmarks/robustness.py --throughput      # how fast each way of doing BPE-dropout is
    python benchmarks/robustness.py --qa              # drug-name QA: plain vs augmented fine-tuning

Writes OUT/robustness.md (the table), OUT/robustness.json and --png (the plot).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from gradlm.files import atomic_write_text
from gradlm.training.config import TrainConfig
from gradlm.text.data import RandomSampler, TokenData, resolve_data
from gradlm.evaluation.evaluate import EvalConfig, run_eval
from gradlm.model.transformer import ModelConfig
from gradlm.rundir import load_model
from gradlm.training.trainer import Trainer, train

DEMO = dict(n_layer=4, d_model=192, n_head=6, block_size=128)


def configs(a) -> dict[str, dict]:
    return {
        "plain": {},
        f"bpe-dropout {a.bpe_dropout:g}": {"bpe_dropout": a.bpe_dropout},
        f"typos {a.typo_rate:g}": {"typo_rate": a.typo_rate},
        "both": {"bpe_dropout": a.bpe_dropout, "typo_rate": a.typo_rate},
    }


def base_config(a, out: Path) -> TrainConfig:
    return TrainConfig(
        data=a.data,
        out=str(out),
        vocab_size=1024,
        batch="32",
        seed=a.seed,
        warmup_steps=30,
        eval_every=10**6,
        progress=False,
        plots=False,
    )


def step_times(a, runs: dict[str, dict], out: Path, rounds: int = 16) -> dict[str, float]:
    """Median seconds per training step (sampler, forward, backward, update) of each configuration,
    measured round-robin so that other load on the machine hits them all alike."""
    trainers = {}
    for name, extra in runs.items():
        cfg = replace(base_config(a, out / "timing" / name.replace(" ", "-")), max_steps=10**6, **extra)
        trainers[name] = Trainer(ModelConfig(**DEMO), cfg, log=lambda m: None).build()
        trainers[name].model.train()
    times: dict[str, list[float]] = {n: [] for n in runs}
    for r in range(rounds + 1):
        for name, t in trainers.items():
            t0 = time.perf_counter()
            t.gradients()
            t.update()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def val_text(run: Path) -> Path:
    """The run's validation split as text (its documents separated by blank lines), for gradlm eval."""
    cfg = json.loads((run / "config.json").read_text())
    data = TokenData(cfg["data"]["path"])
    ids = data.tokens("val").astype(np.int64)
    eot = data.tokenizer.eot_id
    cuts = np.flatnonzero(ids == eot).tolist() + [len(ids)]
    docs = [data.tokenizer.decode(ids[a + 1 : b].tolist()) for a, b in zip(cuts, cuts[1:]) if b > a + 1]
    path = run.parent / "val.txt"
    atomic_write_text(path, "\n\n".join(docs))  # configurations trained in parallel (--jobs) write the same file
    return path


def train_and_score(job) -> dict:
    """Train one configuration for its steps, then score it on the validation text, clean and with typos."""
    a, name, extra, steps, step_s = job
    torch.set_num_threads(a.threads)
    run = Path(a.out) / name.replace(" ", "-")
    t0 = time.time()
    summary = train(ModelConfig(**DEMO), replace(base_config(a, run), max_steps=steps, **extra))
    print(f"{name}: {steps} steps in {time.time() - t0:.0f}s, val bpb {summary['val_bpb']:.4f}", flush=True)
    model, tok = load_model(run)
    report = run_eval(model, tok, EvalConfig(data=str(val_text(run)), typos=a.typos, seed=a.seed, progress=False))
    return {
        "run": name,
        "steps": steps,
        "step_s": step_s,
        "train_s": summary["time_s"],
        "clean_bpb": report["clean"]["bits_per_byte"],
        "noisy_bpb": report["typos"]["noisy"]["bits_per_byte"],
        "penalty": report["typos"]["penalty_bits_per_byte"],
        "words": report["typos"]["words"],
    }


def benchmark(a) -> None:
    out = Path(a.out)
    runs = configs(a)
    t_step = step_times(a, runs, out)
    print("step time (median, s): " + ", ".join(f"{n} {t:.3f}" for n, t in t_step.items()))
    jobs = [
        (a, name, extra, max(1, round(a.steps * t_step["plain"] / t_step[name])), t_step[name])
        for name, extra in runs.items()
    ]
    if a.jobs > 1:  # each configuration trains in a process of its own, a.jobs at a time (1 torch thread each)
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(a.jobs) as pool:
            rows = pool.map(train_and_score, jobs, chunksize=1)
    else:
        rows = [train_and_score(job) for job in jobs]
    plain = rows[0]
    for r in rows:
        r["penalty_change"] = r["penalty"] / plain["penalty"] - 1
        r["clean_change"] = r["clean_bpb"] / plain["clean_bpb"] - 1
    (out / "robustness.json").write_text(json.dumps(rows, indent=2))
    lines = [
        f"| run | steps | step time (s) | clean bits/byte | noisy bits/byte ({a.typos:.0%} typos) | typo penalty | "
        "penalty vs plain | clean bits/byte vs plain | extra bits per misspelled word |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['steps']} | {r['step_s']:.3f} | {r['clean_bpb']:.4f} | {r['noisy_bpb']:.4f} | "
            f"{r['penalty']:+.4f} | "
            f"{r['penalty_change']:+.1%} | {r['clean_change']:+.1%} | "
            f"{r['words']['extra_bits_per_misspelled_word']:+.2f} |"
        )
    table = "\n".join(lines)
    (out / "robustness.md").write_text(table + "\n")
    print(table)
    plot(rows, a)


def plot(rows: list[dict], a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(rows))
    ax1.bar(x - 0.2, [r["clean_bpb"] for r in rows], 0.4, label="clean")
    ax1.bar(x + 0.2, [r["noisy_bpb"] for r in rows], 0.4, label=f"{a.typos:.0%} typos")
    lo = min(r["clean_bpb"] for r in rows)
    ax1.set_ylim(lo * 0.95, max(r["noisy_bpb"] for r in rows) * 1.07)
    ax1.set_ylabel("validation bits per byte")
    ax1.legend(loc="upper right")
    # The penalty split by where its extra bits go (gradlm eval --typos, per word).
    inside = [r["penalty"] * r["words"]["extra_bits_in_misspelled_words"] / r["words"]["extra_bits"] for r in rows]
    ax2.bar(x, inside, 0.5, color="C3", label="on the misspelled words")
    ax2.bar(
        x,
        [r["penalty"] - i for r, i in zip(rows, inside)],
        0.5,
        bottom=inside,
        color="C1",
        label="on the text around them",
    )
    for k, r in enumerate(rows):
        ax2.annotate(f"{r['penalty_change']:+.0%}" if k else "", (k, r["penalty"]), ha="center", va="bottom")
    ax2.set_ylabel("typo penalty (noisy - clean bits/byte)")
    ax2.legend(loc="lower left")
    for ax in (ax1, ax2):
        ax.set_xticks(x, [r["run"] for r in rows], rotation=15)
    fig.suptitle(
        f"Shakespeare, demo model, equal training time ({rows[0]['steps']} plain steps); {a.typos:.0%} typos, seed "
        f"{a.seed}"
    )
    fig.tight_layout()
    Path(a.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.png, dpi=110)
    print(f"plot -> {a.png}")


# ---- throughput: the ways to do BPE-dropout ---------------------------------------------------------------


def throughput(a) -> None:
    """Per-batch cost of each way to re-segment training windows with dropout, against a training step."""
    from tokenizers import Tokenizer as HFTokenizer

    from gradlm.model.transformer import Transformer
    from gradlm.text.augment import RobustSampler, Segmenter

    data = resolve_data(base_config(a, Path(a.out) / "tp"), log=lambda m: None)
    tok, ids = data.tokenizer, data.tokens("train")
    block, batch = DEMO["block_size"], 32
    spec = json.loads(tok.hf.to_str())
    spec["model"]["dropout"] = a.bpe_dropout
    hf_drop = HFTokenizer.from_str(json.dumps(spec))
    plain = RandomSampler(ids, block, 0)
    ours = {
        f"ours, bpe-dropout {a.bpe_dropout:g}": RobustSampler(
            RandomSampler(ids, block, 0), tok, a.bpe_dropout, 0.0, 0, block
        ),
        f"ours, typos {a.typo_rate:g}": RobustSampler(RandomSampler(ids, block, 0), tok, 0.0, a.typo_rate, 0, block),
        "ours, both": RobustSampler(RandomSampler(ids, block, 0), tok, a.bpe_dropout, a.typo_rate, 0, block),
    }

    def hf_on_the_fly():
        x, y = plain.next(batch)
        texts = [tok.decode(torch.cat([x[r, :1], y[r]]).tolist()) for r in range(batch)]
        return hf_drop.encode_batch(texts, add_special_tokens=False)

    cases = {"plain windows (no dropout)": lambda: plain.next(batch), "HF BPE(dropout) on the fly": hf_on_the_fly}
    cases.update({k: (lambda s=s: s.next(batch)) for k, s in ours.items()})
    model = Transformer(ModelConfig(**DEMO, vocab_size=tok.vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = plain.next(batch)

    def step():
        model(x, y).backward()
        opt.step()
        opt.zero_grad()

    cases["training step (demo model)"] = step
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(a.repeats + 1):
        for k, f in cases.items():
            t0 = time.perf_counter()
            f()
            if r:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    # Pre-computed segmentations: segment the training split K times, once, during prepare.
    text = tok.decode(ids[:200_000].astype(np.int64).tolist())
    t0 = time.perf_counter()
    once = Segmenter(tok).encode(text, a.bpe_dropout, np.random.default_rng(0))
    per_byte = (time.perf_counter() - t0) / len(text.encode())
    tokens_per_byte = len(once) / len(text.encode())
    total_bytes = data.meta["splits"]["train"]["bytes"]
    unseeded = hf_drop.encode(text[:2000]).ids != HFTokenizer.from_str(json.dumps(spec)).encode(text[:2000]).ids
    step_s = med["training step (demo model)"]
    print(f"\n{batch} windows of {block} tokens per batch; median of {a.repeats} alternating repeats\n")
    print("| way | ms per batch | share of a training step | seeded (exact resume) |")
    print("|---|---:|---:|:--|")
    for k, v in med.items():
        if k.startswith("training"):
            continue
        seeded = "no: thread RNG, differs run to run" if k.startswith("HF") else "yes"
        print(f"| {k} | {v * 1000:.1f} | {(v - med['plain windows (no dropout)']) / step_s:+.1%} | {seeded} |")
    print(f"| training step (demo model, forward + backward + AdamW) | {step_s * 1000:.0f} | | |")
    print(
        f"\npre-computing K segmentations: {per_byte * total_bytes:.1f} s and "
        f"{tokens_per_byte * total_bytes * ids.itemsize / 1e6:.1f} MB of token files "
        f"per segmentation of the {total_bytes / 1e6:.1f} MB training split (x K); HF dropout gives other ids for the "
        f"same text in a fresh process: {unseeded}"
    )


# ---- drug-name QA: exact match on misspelled questions -------------------------------------------------------


def qa(a) -> None:
    """The README's drug-QA recipe (benchmarks/finetune.py: a base that read the facts, then full
    fine-tuning on the training questions), plainly and with each augmentation of the questions, for
    the same epochs and seeds; exact match on the training, held-out and misspelled questions."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from finetune import BASE, COMMON, QA, RUNS, accuracy, gradlm

    out = Path(a.out) / "qa"
    base = out / "base"
    if not (base / "summary.json").is_file():
        gradlm("train", "--data", str(QA / "facts.txt"), "--out", str(base), *BASE)
    rows = []
    for name, extra in configs(a).items():
        flags = [x for k, v in extra.items() for x in (f"--{k.replace('_', '-')}", str(v))]
        runs = []
        for seed in a.qa_seeds:
            run = out / f"{name.replace(' ', '-')}-seed{seed}"
            if not (run / "summary.json").is_file():
                gradlm(
                    "finetune",
                    str(base),
                    "--data",
                    str(QA / "train.jsonl"),
                    "--out",
                    str(run),
                    *COMMON,
                    *RUNS["full"],
                    "--seed",
                    str(seed),
                    "--no-progress",
                    "--no-plots",
                    *flags,
                )
            runs.append({"seed": seed, **accuracy(run)})
            print(f"{name} seed {seed}: {runs[-1]}", flush=True)
        mean = {k: statistics.mean(r[k] for r in runs) for k in ("train", "heldout", "misspelled")}
        rows.append({"run": name, "runs": runs, **mean})
    (out / "qa.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| fine-tuning | train | heldout | misspelled | misspelled - heldout | misspelled - train |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['train']:.3f} | {r['heldout']:.3f} | {r['misspelled']:.3f} | "
            f"{(r['misspelled'] - r['heldout']) * 100:+.1f} pts | {(r['misspelled'] - r['train']) * 100:+.1f} pts |"
        )
    table = f"exact match, mean of seeds {', '.join(map(str, a.qa_seeds))}\n\n" + "\n".join(lines)
    (out / "qa.md").write_text(table + "\n")
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--out", default="runs/robustness")
    ap.add_argument("--steps", type=int, default=300, help="steps of the plain run; the others get the same wall time")
    ap.add_argument("--bpe-dropout", type=float, default=0.1)
    ap.add_argument("--typo-rate", type=float, default=0.05, help="typos in training windows (augmentation)")
    ap.add_argument("--typos", type=float, default=0.05, help="typos in the evaluation text")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--png", default="docs/img/robustness.png")
    ap.add_argument("--throughput", action="store_true", help="measure the ways to do BPE-dropout instead")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from OUT/robustness.json")
    ap.add_argument("--qa", action="store_true", help="the drug-name QA comparison instead (examples/drugqa)")
    ap.add_argument(
        "--qa-seeds",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[1337, 1],
        help="fine-tuning seeds, comma-separated (results are averaged)",
    )
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train this many configurations at once, each in its own process (with --threads 1, one per core); "
        "steps are fixed from the step times measured first, so the results do not depend on it",
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.plot_only:
        plot(json.loads((Path(a.out) / "robustness.json").read_text()), a)
    elif a.throughput:
        throughput(a)
    elif a.qa:
        qa(a)
    else:
        benchmark(a)


if __name__ == "__main__":
    main()
