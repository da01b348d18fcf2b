"""Shared fixtures: a small corpus, a tiny tokenizer, prepared data and tiny model configs (CPU, fast)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Experiment trackers (tests/test_trackers.py) write to stores of the test session's own, never the user's:
# trackio reads TRACKIO_DIR once, when it is imported; W&B offline; MLflow's store lies beside each run.
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="gradlm-test-trackio-")
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("MLFLOW_TRACKING_URI", None)

from gradlm.model.transformer import ModelConfig
from gradlm.text.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def shakespeare_text() -> str:
    """The real corpus when the mirror has it (CI does), else a synthetic stand-in of similar shape."""
    mirror = os.environ.get("GRADLM_DATA_MIRROR")
    for p in ([Path(mirror) / "tinyshakespeare.txt"] if mirror else []) + [SHARED]:
        if p.is_file():
            return p.read_text(encoding="utf-8")
    import random

    rng = random.Random(0)
    names = ["ROMEO", "JULIET", "MERCUTIO", "NURSE", "FRIAR"]
    words = "thou art the sun and moon my love shall not be sweet night day fair lord good what is in a name".split()
    lines = []
    for _ in range(12000):
        lines.append(
            f"{rng.choice(names)}:\n"
            + " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize()
            + ".\n"
        )
    return "\n".join(lines)


@pytest.fixture(scope="session")
def corpus() -> str:
    return shakespeare_text()


@pytest.fixture(scope="session")
def small_text(corpus) -> str:
    return corpus[:60_000]


@pytest.fixture(scope="session")
def tok(small_text) -> Tokenizer:
    return Tokenizer.train([small_text], 320)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, small_text) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "small.txt"
    p.write_text(small_text, encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, text_file, tok) -> Path:
    from gradlm.text.prepare import prepare

    out = tmp_path_factory.mktemp("prep") / "data"
    # several shards: every test that trains on `prepared` (exact resume, kill -9, DDP) reads across shard boundaries
    meta = prepare(str(text_file), tok, out, val_fraction=0.1, progress=False, workers=1, shard_tokens=4096)
    assert len(meta["splits"]["train"]["shards"]) >= 4
    return out


def tiny_config(vocab_size: int, **kw) -> ModelConfig:
    base = dict(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=4, d_model=32)
    base.update(kw)
    return ModelConfig(**base)


def sharp_model(vocab: int, seed: int = 0, scale: float = 4.0, **kw):
    """A random tiny model (eval mode) with its matrices scaled up, so next-token distributions are
    peaked: losses far from uniform, and greedy choices are not near-ties that float noise could flip."""
    import torch

    from gradlm.model.transformer import Transformer

    torch.manual_seed(seed)
    m = Transformer(tiny_config(vocab, **kw))
    m.reset_parameters(seed=seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return m.eval()


def train_until(model, next_batch, steps: int, until=None, max_steps: int | None = None, lr: float = 1e-2):
    """Train `model` with AdamW on next_batch() -> (x, y), `steps` steps at a time, until until(model) holds
    (checked in eval mode after each round; no condition: one round). Returns the model in eval mode.

    What a fixed number of steps teaches a tiny model differs by CPU (their kernels round differently, and a short
    run is chaotic), so a test that needs the model to have learned something states it as `until`, and asserts
    what that implies; max_steps (default ten rounds) bounds the wait, and not learning by then is a failure."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    max_steps = max_steps or (10 * steps if until else steps)
    for done in range(steps, max_steps + 1, steps):
        model.train()
        for _ in range(steps):
            loss = model(*next_batch())
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        if until is None or until(model):
            return model
    raise AssertionError(f"not learned in {max_steps} steps: a bug in the model, the loss or the batches")


def fit(
    model,
    ids,
    steps: int,
    lr: float = 1e-2,
    batch: int = 16,
    block: int = 32,
    seed: int = 0,
    until=None,
    max_steps: int | None = None,
):
    """Train `model` on random windows of the 1-D id tensor `ids` (train_until); returns it in eval mode."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def windows():
        ix = torch.randint(0, len(ids) - block - 1, (batch,), generator=g).tolist()
        return torch.stack([ids[i : i + block] for i in ix]), torch.stack([ids[i + 1 : i + block + 1] for i in ix])

    return train_until(model, windows, steps, until, max_steps, lr)


def must_agree(ours, theirs):
    """The positions (a bool mask over the rows of two (T, V) logit tensors of one model computed two ways)
    where their argmaxes must agree: ours' top logit leads its second by more than twice the largest difference
    between the two, so no difference that small can reorder them. Elsewhere a near-tie may go either way."""
    top2 = ours.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1] > 2 * (theirs - ours).abs().max()


# A target token the model gives more than this probability is its greedy choice by a lead of at least
# ln(0.6 / 0.4) = 0.4 in logits: no float noise (a KV cache, a batch, another CPU's kernels) can flip it.
LEARNED = 0.6


def replies_learned(model, examples) -> bool:
    """Whether every target token of every example (the replies and their end tokens) has probability > LEARNED
    after its own prefix: then greedy decoding after each prompt writes exactly its reply, by induction on the
    tokens, whatever the CPU."""
    import torch

    from gradlm.text.sft import collate

    with torch.no_grad():
        for ex in examples:
            x, y = collate([ex], 0)  # one example alone: no padding to choose
            probs = model(x).float().softmax(-1)[0]  # (T, V)
            t = (y[0] >= 0).nonzero().squeeze(1)
            if (probs[t, y[0, t]] <= LEARNED).any():
                return False
    return True


def sft_fit(examples, tok, steps: int = 150, batch: int = 4, lr: float = 1e-2, seed: int = 0):
    """A tiny model (eval mode) trained on fine-tuning examples (gradlm.text.sft) until it has learned their replies
    (replies_learned), checked every `steps` steps."""
    import torch

    from gradlm.model.transformer import Transformer
    from gradlm.text.sft import SFTSampler, pad_id

    torch.manual_seed(seed)
    model = Transformer(tiny_config(tok.vocab_size))
    model.reset_parameters(seed=seed)
    sampler = SFTSampler(examples, pad_id(tok), seed=seed)
    return train_until(model, lambda: sampler.next(batch), steps, lambda m: replies_learned(m, examples), lr=lr)


CYCLE = "Hi 🙂é!"  # cut into single bytes by the test tokenizer: 🙂 is four tokens, é two


def cycle_model(tok, text: str = CYCLE, sharpness: float = 1.0, block_size: int = 64, ids: list[int] | None = None):
    """A real Transformer (eval mode) whose next token depends only on the current one: each token of `text`
    is followed by the next one (cyclically) with probability ~0.9 at sharpness 1, so greedy decoding
    from text[0] writes text[1:] + text + ... exactly, while sampling still varies.

    Its blocks add nothing (their output projections are zero), so the last hidden state is the current
    token's embedding; the head scores token y by how much the current token looks like y's predecessor."""
    import torch

    from gradlm.model.transformer import Transformer

    ids = tok.encode(text) if ids is None else ids  # ids: a cycle of token ids (special tokens allowed)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{text!r} repeats a token: the next token would be ambiguous")
    torch.manual_seed(0)
    m = Transformer(tiny_config(tok.vocab_size, n_layer=1, d_model=64, block_size=block_size))
    V, d = tok.vocab_size, 64
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        emb = torch.randn(V, d, generator=torch.Generator().manual_seed(0))
        m.embed_tokens.weight.copy_(emb)
        unit = emb / emb.pow(2).mean(-1, keepdim=True).sqrt()  # what the final RMSNorm makes of each embedding
        head = torch.zeros(V, d)
        for prev, nxt in zip(ids, ids[1:] + ids[:1]):
            head[nxt] = sharpness * unit[prev] / d**0.5  # score d**0.5 * sharpness after its predecessor
        m.lm_head.weight.copy_(head)
    return m.eval()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test caches prepared data (and compiled graphs) in its own folder, so tests never see each other's cache.
    (gradlm.model.compiling.use_cache writes TORCHINDUCTOR_CACHE_DIR; the monkeypatch puts it back after the test.)"""
    monkeypatch.setenv("GRADLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


def generate_ids(model, tok, prompts, cfg, stop_ids=frozenset()):
    """Generated ids through the engine: a list for one prompt (a list of ids), a list of lists for several
    (decoded together). Every generated id is listed, a final stop id included."""
    from gradlm.generation.engine import Engine, Request

    one = bool(prompts) and isinstance(prompts[0], int)
    prompts = [prompts] if one else prompts
    engine = Engine(model, tok, max_batch=len(prompts))
    runs = engine.run([Request(list(p), cfg, 1, frozenset(stop_ids), slide=True) for p in prompts])
    out = [[piece.token.id for piece in pieces] for pieces in runs]
    return out[0] if one else out


def write_run(d, model, tok):
    """A minimal run directory holding model and tok (config.json, tokenizer.json, model.safetensors)."""
    from gradlm import files as ckpt

    d.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(d / "config.json", {"model": model.cfg.to_dict()})
    tok.save(d / "tokenizer.json")
    ckpt.save_weights(d / "model.safetensors", model.state_dict())
    return d


def wait_for_step(run, step: int, proc, timeout: float = 120) -> None:
    """Until the run (trained by the process proc) has logged step `step` in its metrics.jsonl."""
    import json
    import time

    end = time.time() + timeout
    while time.time() < end:
        if (run / "metrics.jsonl").is_file() and any(
            json.loads(ln).get("step", 0) >= step
            for ln in (run / "metrics.jsonl").read_text().splitlines()
            if ln.strip()
        ):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


def start_gradlm(*args, **kw):
    """`python -m gradlm ARGS` in a process of its own, its output captured as text."""
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "gradlm", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def kill_and_resume(run, proc, at_steps, resume: list, rng, pause: float, last: int):
    """SIGKILL the training process proc at a seeded random moment (up to pause s) after each step of at_steps,
    unless it has ended, each time starting `gradlm *resume` in its place; returns (the last process, kills). A kill
    that came after the run's final weights (step `last`) were written, while the process was still ending, leaves a
    finished run, which a resume would refuse (its budget is spent): then the process is None."""
    import time

    from gradlm.rundir import weights_step

    kills = 0
    for target in at_steps:
        wait_for_step(run, target, proc)
        time.sleep(rng.uniform(0.0, pause))
        if proc.poll() is not None:
            break
        proc.kill()
        proc.communicate()
        kills += 1
        if (run / "model.safetensors").is_file() and weights_step(run / "model.safetensors") == last:
            return None, kills
        proc = start_gradlm(*resume)
    return proc, kills
