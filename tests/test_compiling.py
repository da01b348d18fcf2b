"""torch.compile never surprises a user (gradlm/model/compiling.py): each compile is said once with its time, what it
compiled is kept under $GRADLM_CACHE/inductor, and a compile that fails runs the step eagerly with one warning."""

from __future__ import annotations

import os

import torch

from gradlm import TrainConfig, train
from gradlm.model import compiling
from gradlm.model.compiling import Compiled
from gradlm.model.infer import Forward, decode
from gradlm.model.sampling import SamplingConfig

from conftest import sharp_model, tiny_config


def test_each_new_shape_says_it_compiled_once_and_inductor_caches_in_gradlms_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADLM_CACHE", str(tmp_path))
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # the user set no TORCHINDUCTOR_CACHE_DIR, and torch wrote its /tmp default there (importing torch._dynamo and
    # torch.optim's first step do): gradlm's cache wins all the same
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # restored after the test
    lines = []
    # dynamo's graphs without inductor's C++ (seconds, not tens of them): what is said does not depend on the backend
    step = Compiled(lambda x: torch.sin(x) * 2 + 1, "a test step", say=lines.append, dynamic=False, backend="eager")
    x = torch.arange(6.0)
    assert torch.allclose(step(x), torch.sin(x) * 2 + 1)
    step(x + 1)  # the same shape: no second compile
    assert len(lines) == 1 and lines[0].startswith("compiling a test step: ") and str(tmp_path / "inductor") in lines[0]
    step(torch.arange(9.0))  # a new shape compiles again, and says so
    assert len(lines) == 2 and lines[1].startswith("compiling a test step: ")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")  # where inductor keeps its graphs
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # a folder the user named wins
    assert compiling.use_cache() == tmp_path / "mine"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_a_step_that_fails_to_compile_runs_eagerly_after_one_warning(monkeypatch, tok):
    def broken_compile(fn, **options):
        def compiled(*args, **kwargs):
            raise RuntimeError("inductor could not lower this\nand more detail")

        return compiled

    monkeypatch.setattr(compiling.torch, "compile", broken_compile)
    model = sharp_model(tok.vocab_size)
    cfg = SamplingConfig(temperature=0, max_new_tokens=12)
    want = decode(model, [1, 2, 3], 12, cfg, forward=Forward(model))
    lines = []
    forward = Forward(model, compile=True)
    forward._fused.say = lines.append
    assert decode(model, [1, 2, 3], 12, cfg, forward=forward) == want
    assert decode(model, [4, 5], 6, cfg, forward=forward)  # and again: eager from now on, no second warning
    assert lines == [
        "warning: compiling the decode step failed (RuntimeError: inductor could not lower this); running it without "
        "compiling (--compile off skips the attempt)"
    ]


def test_a_compiled_training_run_says_when_it_compiles(prepared, tok, tmp_path, monkeypatch, capsys):
    """--compile on: the trainer says each compile of its step (on CUDA its evaluation too), with the step."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="eager", **kw))  # no C++: seconds
    cfg = TrainConfig(data=str(prepared), out=str(tmp_path / "run"), batch="4", max_steps=6, eval_every=3,
                      eval_tokens=256, compile="on", progress=False, plots=False)  # fmt: skip
    train(tiny_config(tok.vocab_size), cfg)
    said = [line.split(":")[0] for line in capsys.readouterr().err.splitlines() if line.startswith("compiling")]
    # the first step compiles; dynamo may compile the step once more while it learns what varies; on the CPU the
    # evaluation runs uncompiled (its compile is not repaid); after that every step reuses what was compiled
    assert said[0] == "compiling the training step (step 1)" and "compiling the evaluation" not in said, said
    assert not {f"compiling the training step (step {k})" for k in (4, 5, 6)} & set(said), said


def test_a_compile_auto_chose_that_failed_trains_on_as_if_never_tried(prepared, tok, tmp_path, monkeypatch, capsys):
    """--compile auto compiles a CPU run whose time budget repays it; if the compiler fails (no C++ compiler, say), the
    run goes on uncompiled after one warning line and trains exactly as --compile off. --compile on raises instead."""
    import pytest
    from safetensors.torch import load_file
    from torch._dynamo.exc import BackendCompilerFailed

    from gradlm import runtime

    def broken_compile(model, **options):
        def run(*args, **kwargs):
            raise BackendCompilerFailed(broken_compile, RuntimeError("Failed to find C compiler\nmore"), None)

        return run

    common = dict(data=str(prepared), batch="4", max_steps=4, max_time="10m", eval_every=2, eval_tokens=256,
                  progress=False, plots=False)  # fmt: skip
    off = train(tiny_config(tok.vocab_size), TrainConfig(out=str(tmp_path / "off"), compile="off", **common))
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(runtime.shutil, "which", lambda name: f"/usr/bin/{name}")  # a C++ compiler, as auto sees it
    capsys.readouterr()
    auto = train(tiny_config(tok.vocab_size), TrainConfig(out=str(tmp_path / "auto"), compile="auto", **common))
    err = capsys.readouterr().err
    assert err.count("warning: compiling the training step failed (BackendCompilerFailed: ") == 1, err
    assert "training goes on without compiling" in err
    assert auto["steps"] == off["steps"] == 4 and auto["val_loss"] == off["val_loss"]
    a, b = load_file(tmp_path / "auto" / "model.safetensors"), load_file(tmp_path / "off" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
    with pytest.raises(BackendCompilerFailed):  # asked for: the failure is the user's to see
        train(tiny_config(tok.vocab_size), TrainConfig(out=str(tmp_path / "on"), compile="on", **common))


def test_compile_auto_compiles_a_short_run_whose_shape_compiled_before(prepared, tok, tmp_path, monkeypatch, capsys):
    """A 2-minute CPU run cannot repay compiling with an empty cache (~31-42 s), so --compile auto leaves it eager; once
    a run of the same shape compiled in this cache (its graphs are read back in seconds), auto compiles it. Another
    shape stays eager, and a resumed run compiles exactly when its start did (a resume is bit-exact)."""
    from gradlm import runtime

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="eager", **kw))  # no C++: seconds
    monkeypatch.setattr(runtime.shutil, "which", lambda name: f"/usr/bin/{name}")  # a C++ compiler, as auto sees it
    torch._dynamo.reset()  # graphs an earlier test compiled in this process would not count as compiled here
    common = dict(data=str(prepared), max_steps=4, max_time="2m", eval_every=2, eval_tokens=256, progress=False,
                  plots=False)  # fmt: skip

    def compiled(name: str, batch: str, compile: str, **kw) -> tuple[bool, str]:
        """Whether the run trained compiled, and the line that said why (if any)."""
        capsys.readouterr()
        cfg = TrainConfig(out=str(tmp_path / name), batch=batch, compile=compile, **common, **kw)
        train(tiny_config(tok.vocab_size), cfg)
        err = capsys.readouterr().err.splitlines()
        model = next(line for line in err if line.startswith("model: "))  # the run's description
        why = [line for line in err if line.startswith("compiling the training step: ")]
        return model.endswith(", compiled"), why[0] if why else ""

    # nothing compiled before: 2 minutes do not repay ~31-42 s
    assert compiled("first", "4", "auto", pause_at=2) == (False, "")
    assert compiled("compiled", "4", "on") == (True, "")
    assert compiled("first", "4", "auto", resume=True) == (False, "")  # it started uncompiled
    on, why = compiled("again", "4", "auto", pause_at=2)
    assert on and why.startswith("compiling the training step: this shape compiled before (~5 s to read it back)"), why
    on, why = compiled("again", "4", "auto", resume=True)
    assert on and why.startswith("compiling the training step: it did when the run started"), why
    assert compiled("other", "2", "auto") == (False, "")  # another batch: another graph, never compiled here


def test_a_compiled_step_with_dropout_is_one_graph_and_drops_what_the_uncompiled_step_drops(prepared, tok, tmp_path,
                                                                                            monkeypatch):  # fmt: skip
    """On the CPU a compiled step takes its dropout's random bytes as an input, drawn before the step, instead of
    breaking its graph at every dropout to draw them; under bf16 autocast the masks are the uncompiled step's, so the
    run trains to the same weights."""
    from safetensors.torch import load_file

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="eager", **kw))  # no C++: seconds
    torch._dynamo.reset()
    common = dict(data=str(prepared), batch="4", max_steps=3, eval_every=3, eval_tokens=256, dtype="bfloat16",
                  progress=False, plots=False)  # fmt: skip
    model = tiny_config(tok.vocab_size, dropout=0.1)
    before = compiling.graphs_compiled()
    on = train(model, TrainConfig(out=str(tmp_path / "on"), compile="on", **common))
    graphs = compiling.graphs_compiled() - before
    off = train(
        tiny_config(tok.vocab_size, dropout=0.1), TrainConfig(out=str(tmp_path / "off"), compile="off", **common)
    )
    # one graph for the step (dynamo may compile it once more while it learns what varies); a graph break at each of
    # the 2 layers x 3 dropouts would make 7 or more
    assert graphs <= 2, graphs
    assert on["val_loss"] == off["val_loss"]
    a, b = load_file(tmp_path / "on" / "model.safetensors"), load_file(tmp_path / "off" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_the_compile_record_never_fails_a_run(tmp_path, monkeypatch):
    """The note of which training steps compiled in the cache only saves later runs time: a record that cannot be
    written is skipped, and one that is not what remember_compile writes reads as nothing compiled."""
    blocked = tmp_path / "a file"
    blocked.write_text("")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(blocked / "inductor"))  # no folder can be made there
    compiling.remember_compile(["a step"], 30.0)
    assert compiling.compiled_before(["a step"]) is None
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    compiling.remember_compile(["a step"], 30.0)  # the first compile: a cold one
    assert compiling.compiled_before(["a step"]) == 0.0 and compiling.compiled_before(["another"]) is None
    compiling.remember_compile(["a step"], 4.0)
    compiling.remember_compile(["a step"], 35.0)  # evicted and compiled again: the warm time stays the fastest
    assert compiling.compiled_before(["a step"]) == 4.0
    (tmp_path / "inductor" / "gradlm-compiled.json").write_text('["not", "a record"]')
    assert compiling.compiled_before(["a step"]) is None
