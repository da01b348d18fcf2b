"""--size auto: the chooser is a pure function of (budget, corpus tokens, throughput); the trainer applies it."""

import json
from contextlib import nullcontext

import pytest
import torch

from gradlm.training import autosize
from gradlm.training.autosize import Allowance, Probe, choose, choose_vocab
from gradlm.model.transformer import ModelConfig, flops_per_token, matmul_params

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice


def flat_machine(flops_per_s: float = 1e11):
    """A machine that runs every model at the same FLOP rate."""
    return lambda cfg, batch, dropout=0.0: flops_per_s / flops_per_token(cfg)


def test_more_time_never_gives_a_smaller_model():
    last = 0
    sizes = []
    for seconds in (5, 10, 30, 60, 90, 180, 300, 600, 1800, 3600, 4 * 3600):
        c = choose(Allowance(seconds=seconds), corpus_tokens=10**9, tokens_per_s=flat_machine(), vocab_size=1030)
        assert c.params >= last, (seconds, c.reason)
        last = c.params
        sizes.append(c.params)
        assert not c.capped
    assert sizes[-1] > 20 * sizes[0]  # the dial really moves


def test_bigger_budgets_of_tokens_and_steps_grow_the_model_too():
    by_tokens = [choose(Allowance(tokens=n), 10**9, flat_machine(), 1030).params for n in (10**5, 10**6, 10**7, 10**8)]
    by_steps = [choose(Allowance(steps=n), 10**9, flat_machine(), 1030).params for n in (10, 100, 1000, 10000)]
    assert by_tokens == sorted(by_tokens) and by_tokens[-1] > by_tokens[0]
    assert by_steps == sorted(by_steps) and by_steps[-1] > by_steps[0]


def test_the_chosen_model_fits_its_budget_and_the_next_one_would_not():
    c = choose(Allowance(seconds=600), 10**9, flat_machine(), 1030, tokens_per_param=2.0)
    assert c.tokens >= 2.0 * c.params
    i = next(i for i, (n, d) in enumerate(autosize.LADDER) if (n, d) == (c.model["n_layer"], c.model["d_model"]))
    bigger = autosize.rung(i + 1, 1030)
    assert flat_machine()(bigger, 16) * 600 < 2.0 * matmul_params(bigger)


def test_a_small_corpus_caps_the_model_however_long_the_budget():
    corpus = 50_000
    sizes = [choose(Allowance(seconds=s), corpus, flat_machine(), 1030) for s in (60, 600, 6000, 60000)]
    assert sizes[-1].capped
    assert sizes[-1].params == sizes[-2].params  # capped: more time no longer grows it
    assert sizes[-1].params <= autosize.REPEATS * corpus / autosize.TOKENS_PER_PARAM  # the most the corpus is worth
    big = choose(Allowance(seconds=60000), 10**9, flat_machine(), 1030)
    assert big.params > sizes[-1].params and not big.capped
    assert "caps it" in sizes[-1].reason and "caps it" not in big.reason


def test_repeated_data_is_worth_less_and_less_and_brings_dropout():
    corpus = 100_000
    worth = [autosize.useful_tokens(e * corpus, corpus) for e in (0.5, 1, 2, 4, 8, 16, 1000)]
    assert worth[0] == pytest.approx(0.5 * corpus, rel=0.1)  # fresh data counts in full
    gains = [b - a for a, b in zip(worth, worth[1:])]
    assert all(g > 0 for g in gains) and worth[-1] <= autosize.REPEATS * corpus
    assert worth[3] / 4 > worth[5] / 16  # a pass is worth less the more often it repeats
    drops = [choose(Allowance(seconds=s), corpus, flat_machine(), 1030).model["dropout"] for s in (1, 10, 100, 1000)]
    assert drops == sorted(drops) and drops[0] == 0.0 and drops[-1] > 0
    assert choose(Allowance(seconds=1000), corpus, flat_machine(), 1030, fixed={"dropout": 0.0}).model["dropout"] == 0.0


def test_the_chosen_model_is_timed_as_it_will_train():
    """The ladder is compared at batch 16 without dropout; the chosen model's tokens come from a measurement
    at its own batch and dropout. Here small batches and dropout are slower, as on a CPU: the first estimate
    (> 4 passes) would bring dropout, the real speed gives < 4 passes and so none."""
    asked = []

    def machine(cfg, batch, dropout=0.0):
        asked.append((batch, dropout))
        return 1e11 / flops_per_token(cfg) * (1.0 if batch >= 16 else 0.7) * (0.8 if dropout else 1.0)

    shape = {"n_layer": 4, "d_model": 128, "n_head": 4}  # one model, so the corpus alone sets the passes
    flat = choose(Allowance(seconds=60), 10**6, flat_machine(), 1030, fixed=shape)
    corpus = int(flat.tokens / 4.2)
    # at batch 16's speed
    assert choose(Allowance(seconds=60), corpus, flat_machine(), 1030, fixed=shape).model["dropout"] > 0
    c = choose(Allowance(seconds=60), corpus, machine, 1030, fixed=shape)
    batch, dropout = int(c.train["batch"]), c.model["dropout"]
    assert asked[-1] == (batch, dropout) and batch < 16 and dropout == 0.0
    assert c.tokens / corpus < 4
    assert c.tokens_per_s == pytest.approx(
        machine(ModelConfig(vocab_size=1030, **{k: c.model[k] for k in autosize.MODEL_KEYS}), batch, dropout)
    )
    assert c.tokens == pytest.approx(60 * c.tokens_per_s)

    asked.clear()  # on the edge (dropout's cost flips the decision back and forth): the last measured setting stands

    def flip(cfg, batch, dropout=0.0):
        asked.append((batch, dropout))
        return 1e11 / flops_per_token(cfg) * (0.5 if dropout else 1.0)

    c = choose(Allowance(seconds=60), corpus, flip, 1030, fixed=shape)
    assert asked[-1] == (int(c.train["batch"]), c.model["dropout"])


def test_a_faster_machine_buys_a_model_at_least_as_large():
    slow = choose(Allowance(seconds=300), 10**9, flat_machine(3e10), 1030)
    fast = choose(Allowance(seconds=300), 10**9, flat_machine(3e11), 1030)
    assert fast.params > slow.params


def test_explicit_settings_always_win():
    fixed = {
        "n_layer": 3,
        "block_size": 64,
        "batch": "24",
        "lr": 1e-3,
        "warmup_steps": 7,
        "min_lr_ratio": 0.2,
        "eval_every": 5,
        "eval_tokens": 999,
    }
    for seconds in (10, 600, 6000):
        c = choose(Allowance(seconds=seconds), 10**9, flat_machine(), 1030, fixed=fixed)
        assert c.model["n_layer"] == 3 and c.model["block_size"] == 64
        assert c.train == {k: v for k, v in fixed.items() if k in autosize.TRAIN_KEYS}
    wide = choose(Allowance(seconds=6000), 10**9, flat_machine(), 1030, fixed={"d_model": 96, "n_head": 3})
    assert wide.model["d_model"] == 96 and wide.model["n_head"] == 3


def test_a_fixed_width_gets_heads_of_its_own_size():
    """--d-model 96 on a rung 512 wide: 3 heads of 32 (not the rung's 16 heads of 6); a width 32 does not divide
    gets the most heads that divide it; a fixed --n-head is kept."""
    wide = len(autosize.LADDER) - 4
    assert autosize.rung(wide, 1024, {"d_model": 96}).n_head == 3
    assert autosize.rung(wide, 1024, {"d_model": 320}).n_head == 5  # 64 per head above 256 wide
    assert autosize.rung(wide, 1024, {"d_model": 100}).n_head == 2  # 100 // 32 = 3 does not divide 100
    assert autosize.rung(wide, 1024, {"d_model": 96, "n_head": 4}).n_head == 4


def test_the_context_fits_the_data():
    c = choose(Allowance(seconds=60), 200, flat_machine(), 1030, max_block=50)
    assert c.model["block_size"] <= 50


def test_the_reason_names_the_choice_and_the_measurement():
    c = choose(Allowance(seconds=600), 10**7, flat_machine(), 1030)
    for part in (
        f"{c.model['n_layer']} layers x {c.model['d_model']}",
        "tok/s measured",
        "tokens/param",
        "epochs",
        "600 s",
    ):
        assert part in c.reason, c.reason


def test_vocabulary_grows_with_the_corpus_within_bounds():
    sizes = [choose_vocab(n) for n in (10_000, 10**6, 8 * 10**6, 64 * 10**6, 10**10)]
    assert sizes == sorted(sizes)
    assert sizes[0] == 512 and sizes[1] == 1024 and sizes[-1] == 8192


def test_probe_measures_real_steps_and_extrapolates_once_spent():
    torch.manual_seed(0)

    def sample(batch, block):
        x = torch.randint(0, 300, (batch, block))
        return x, x

    probe = Probe(sample, nullcontext, "cpu", limit_s=0.0)
    small = ModelConfig(vocab_size=300, n_layer=1, d_model=32, n_head=2, block_size=16)
    tps = probe(small, 4)
    assert tps > 0 and probe.flops_rate == pytest.approx(tps * flops_per_token(small))
    big = ModelConfig(vocab_size=300, n_layer=2, d_model=64, n_head=2, block_size=16)
    assert probe(big, 4) == pytest.approx(probe.flops_rate / flops_per_token(big))  # limit spent: no new measurement
    assert probe(small, 4) == tps  # memoised


# ---- the trainer applies the choice ------------------------------------------------------------------


def _run(args):
    from gradlm.cli import main

    try:
        main(args)
    except SystemExit as e:
        assert not e.code, e.code


def test_train_without_model_flags_sizes_itself_and_records_why(text_file, tmp_path, capsys):
    out = tmp_path / "auto"
    _run(["train", "--data", str(text_file), "--out", str(out), "--max-time", "4s", "--no-progress", "--no-plots"])
    log = capsys.readouterr()
    said = [ln for ln in (log.out + log.err).splitlines() if ln.startswith("size auto:")]
    assert len(said) == 1 and "tok/s measured" in said[0] and "probe" in said[0]
    config = json.loads((out / "config.json").read_text())
    assert config["size"]["reason"] in said[0]
    m, t = config["model"], config["train"]
    i = [tuple(r) for r in autosize.LADDER].index((m["n_layer"], m["d_model"]))
    assert f"{m['n_layer']} layers x {m['d_model']}" in said[0] and i >= 0
    assert t["min_lr_ratio"] == 0.0 and t["size"] == "auto"
    assert config["size"]["probe_s"] <= 0.05 * 4 + 1.0  # the probe's limit (plus one step it cannot cut short)
    # The run resumes with its recorded shape and settings; no new choice is made.
    _run(["train", "--out", str(out), "--resume", "--max-time", "6s", "--no-progress", "--no-plots"])
    log = capsys.readouterr()
    assert "size auto:" not in log.out + log.err
    assert json.loads((out / "config.json").read_text())["model"] == m


def test_typed_flags_win_and_a_model_flag_turns_auto_sizing_off(text_file, tmp_path, capsys):
    out = tmp_path / "flags"
    _run(
        [
            "train",
            "--data",
            str(text_file),
            "--out",
            str(out),
            "--max-steps",
            "2",
            "--batch",
            "3",
            "--lr",
            "0.002",
            "--vocab-size",
            "300",
            "--no-progress",
            "--no-plots",
        ]
    )
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["batch"] == 3 and config["train"]["lr"] == 0.002 and config["model"]["vocab_size"] == 306
    assert "size" in config  # sized, with those three kept
    fixed = tmp_path / "fixed"
    _run(
        [
            "train",
            "--data",
            str(text_file),
            "--out",
            str(fixed),
            "--max-steps",
            "2",
            "--n-layer",
            "1",
            "--no-progress",
            "--no-plots",
        ]
    )
    config = json.loads((fixed / "config.json").read_text())
    assert (
        "size" not in config and config["model"]["n_layer"] == 1 and config["model"]["d_model"] == ModelConfig().d_model
    )
    partial = tmp_path / "partial"
    _run(
        [
            "train",
            "--data",
            str(text_file),
            "--out",
            str(partial),
            "--max-steps",
            "2",
            "--n-layer",
            "1",
            "--size",
            "auto",
            "--no-progress",
            "--no-plots",
        ]
    )
    config = json.loads((partial / "config.json").read_text())
    assert "size" in config and config["model"]["n_layer"] == 1


def test_no_ladder_model_fitting_the_fixed_settings_is_a_config_error():
    from gradlm.errors import ConfigError

    with pytest.raises(ConfigError, match="--n-head 9"):
        choose(Allowance(steps=10), 10**6, flat_machine(), 1030, fixed={"n_head": 9})


def test_ddp_ranks_train_the_shape_rank_0_chose(text_file, tmp_path):
    import os
    import subprocess
    import sys

    from test_trainer import _free_port

    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            "-m",
            "gradlm",
            "train",
            "--data",
            str(text_file),
            "--out",
            str(out),
            "--max-time",
            "3s",
            "--no-progress",
            "--no-plots",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    said = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("size auto:")]
    assert len(said) == 1 and "tok/s measured" in said[0]  # one choice, made on rank 0
    assert json.loads((out / "config.json").read_text())["size"]["reason"] in said[0]


# ---- the probe under a busy neighbour: one core shared with a process that never sleeps

_PINNED_PROBE = r"""
import json, os, subprocess, sys, time
import torch
from gradlm.training import autosize
from gradlm.training.autosize import Allowance, Probe, choose, own_time
os.sched_setaffinity(0, {0})        # this process and its threads on core 0 ...
torch.set_num_threads(1)
tokens = torch.randint(0, 300, (200_000,))

def sample(batch, block):
    starts = torch.randint(0, len(tokens) - block - 1, (batch,), generator=torch.Generator().manual_seed(0))
    x = torch.stack([tokens[s : s + block] for s in starts])
    return x, torch.stack([tokens[s + 1 : s + block + 1] for s in starts])

def spin():  # 0.15 s of this process's CPU time
    end = time.process_time() + 0.15
    while time.process_time() < end:
        pass

def measure():
    probe = Probe(sample, __import__("contextlib").nullcontext, "cpu", limit_s=2.0)
    c = choose(Allowance(seconds=40), 10**8, probe, 306)
    rung = [(l, d) for l, d in autosize.LADDER].index((c.model["n_layer"], c.model["d_model"]))
    walls = []
    for _ in range(3):
        t0 = time.perf_counter(); spin(); walls.append(time.perf_counter() - t0)
    return {"rung": rung, "tps": c.tokens_per_s, "own": min(own_time(spin) for _ in range(3)), "wall": min(walls)}

quiet = measure()
# ... and a neighbour
busy = subprocess.Popen([sys.executable, "-c", "import os; os.sched_setaffinity(0, {0})\nwhile True: pass"])
time.sleep(0.3)
try:
    loaded = measure()
finally:
    busy.kill()
print(json.dumps({"quiet": quiet, "loaded": loaded}))
"""


@pytest.mark.timing  # it makes its own busy neighbour and needs the core to itself otherwise
@pytest.mark.skipif(
    not hasattr(__import__("os"), "sched_setaffinity") or not __import__("os").path.exists("/proc/self/task"),
    reason="Linux only",
)
def test_the_probe_follows_the_machine_not_a_busy_neighbour():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _PINNED_PROBE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    quiet, loaded = m["quiet"], m["loaded"]
    assert loaded["wall"] > 1.3 * loaded["own"], m  # the neighbour really took a share of the core ...
    assert loaded["own"] < 1.3 * quiet["own"], m  # ... and own_time does not count what it took
    assert abs(loaded["rung"] - quiet["rung"]) <= 1, m  # the same rung, or the next one
    assert loaded["tps"] > 0.6 * quiet["tps"], m
