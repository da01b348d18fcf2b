"""Where a run starts again: a budget extended on resume starts a new schedule phase, for text and for
conversations alike (tests/test_rundir.py and tests/test_trainer.py hold exact resume and the run's files)."""

import json

import pytest

from gradlm.training.config import TrainConfig
from gradlm.errors import ConfigError
from gradlm.training.finetune import finetune
from gradlm.rundir import read_metrics
from gradlm.training.trainer import train

from conftest import tiny_config

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice

BASE = dict(
    batch="4",
    eval_every=5,
    log_every=1,
    warmup_steps=0,
    progress=False,
    plots=False,
    dtype="float32",
    vocab_size=300,
    seed=0,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("base") / "run"
    train(tiny_config(300), TrainConfig(data=str(text_file), out=str(out), max_steps=3, **BASE))
    return out


def test_a_chat_finetune_extended_by_epochs_on_resume_trains_the_new_epoch(base, tmp_path):
    """Extending a fine-tune on conversations by --max-epochs sizes the new phase's warmup from the
    conversations' epochs (it once read the token count of a text corpus it does not have, and crashed)."""
    rows = [
        {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
        for i in range(30)
    ]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ft = dict(data=str(qa), out=str(tmp_path / "ft"), **BASE)
    first = finetune(str(base), TrainConfig(max_epochs=1, **ft))
    with pytest.raises(ConfigError, match="has finished its budget"):
        finetune("", TrainConfig(max_epochs=1, resume=True, **ft), given={"resume", "data", "out"})
    second = finetune("", TrainConfig(max_epochs=2, resume=True, **ft), given={"max_epochs", "resume", "data", "out"})
    assert second["epochs"] == 2 and second["steps"] == 2 * first["steps"]
    lrs = [r["lr"] for r in read_metrics(tmp_path / "ft") if "lr" in r and r["step"] > first["steps"]]
    assert lrs and max(lrs) > lrs[-1]  # the new phase warmed up, then decayed


def test_the_counters_live_in_one_train_state_that_round_trips():
    import math

    from gradlm.training.resume import TrainState

    s = TrainState(step=7)
    assert s.evaluated(3.0, 2.9, min_delta=0.0) and (s.best_val, s.bad_evals) == (3.0, 0)
    s.step = 9
    assert not s.evaluated(2.995, 2.8, min_delta=0.01) and (s.best_val, s.bad_evals) == (3.0, 1)
    assert s.eval_history == [(3.0, 2.9, 7), (2.995, 2.8, 9)] and s.restarted() == 1
    again = TrainState()
    again.load_state_dict({**s.state_dict(), "unknown": 1})
    assert again == s and TrainState().best_val == math.inf


def test_no_module_but_the_trainer_writes_the_trainers_attributes():
    """The trainer's state has one owner: other modules read t.step etc. and update t.state through its methods."""
    import re
    from pathlib import Path

    import gradlm

    pattern = re.compile(r"\bt\.[a-z_]+\s*(\+|-)?=[^=]|setattr\(t\b")
    writers = [
        f"{p.name}:{i}"
        for p in Path(gradlm.__file__).parent.rglob("*.py")
        if p.name != "trainer.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not writers, writers
