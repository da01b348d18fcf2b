"""The runtime's rules as pure functions of the flags and the machine; what depends on the device."""

from __future__ import annotations

import pytest
import torch

from gradlm.errors import ConfigError
from gradlm.runtime import COMPILE_COST, Machine, Runtime, resolve

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice

CPU = Machine()
CPU_BF16 = Machine(cpu_bf16=True)
ONE_GPU = Machine(cuda=1, cuda_bf16=True)
OLD_GPU = Machine(cuda=2, cuda_bf16=False)  # before compute capability 8.0: no native bfloat16
MAC = Machine(mps=True, cpu_bf16=False)
CPU_AVX512 = Machine(cpu_bf16=True, cpu_int8=True)
AVX512_GPU = Machine(cuda=1, cuda_bf16=True, cpu_int8=True)
NO_COMPILER = Machine(cpu_bf16=True, cpu_compiler=False)


@pytest.mark.parametrize(
    "machine, flags, want",
    [
        (CPU, {}, Runtime("cpu", "float32", False)),
        (CPU_BF16, {}, Runtime("cpu", "bfloat16", False)),
        (CPU_BF16, {"inference": True}, Runtime("cpu", "float32", False)),
        (ONE_GPU, {}, Runtime("cuda:0", "bfloat16", True)),
        (ONE_GPU, {"inference": True}, Runtime("cuda:0", "bfloat16", False)),  # compiling decoding: only when asked
        (ONE_GPU, {"inference": True, "compile": "on"}, Runtime("cuda:0", "bfloat16", True)),
        (CPU_BF16, {"decoding": True, "dtype": "int8"}, Runtime("cpu", "int8", False)),
        # decoding: int8 where it is fast, with the compiled one-row step when one is in the cache
        (CPU_AVX512, {"decoding": True}, Runtime("cpu", "int8", False, "cached")),
        (CPU_AVX512, {"decoding": True, "dtype": "float32"}, Runtime("cpu", "float32", False, "cached")),  # exact
        (CPU_AVX512, {"inference": True}, Runtime("cpu", "float32", False)),  # scoring never int8
        (CPU, {"decoding": True}, Runtime("cpu", "float32", False, "cached")),  # no AVX512: int8's kernel is scalar
        # serve and chat keep running: the step is built in the background the first time (a C++ compiler needed)
        (CPU_AVX512, {"serving": True}, Runtime("cpu", "int8", False, "background")),
        (NO_COMPILER, {"serving": True}, Runtime("cpu", "float32", False, "cached")),
        # --compile on builds it before the first token; on the CPU it replaces torch.compile of the eager step
        (CPU_AVX512, {"decoding": True, "compile": "on"}, Runtime("cpu", "int8", False, "build")),
        (CPU, {"decoding": True, "dtype": "int8", "compile": "on"}, Runtime("cpu", "int8", False)),  # no form there
        (CPU_AVX512, {"serving": True, "compile": "off"}, Runtime("cpu", "int8", False, "off")),
        (CPU_BF16, {"decoding": True, "dtype": "bfloat16"}, Runtime("cpu", "bfloat16", False, "off")),  # float32 only
        (AVX512_GPU, {"decoding": True}, Runtime("cuda:0", "bfloat16", False)),
        # decoding on CUDA with --compile on: the one-token step in CUDA graphs, not torch.compile
        (ONE_GPU, {"decoding": True, "compile": "on"}, Runtime("cuda:0", "bfloat16", False, "graphs")),
        (
            ONE_GPU,
            {"serving": True, "compile": "on", "dtype": "float32"},
            Runtime("cuda:0", "float32", False, "graphs"),
        ),
        (ONE_GPU, {"device": "cpu"}, Runtime("cpu", "float32", False)),
        (OLD_GPU, {}, Runtime("cuda:0", "float32", True)),
        (OLD_GPU, {"device": "cuda:1", "dtype": "bfloat16"}, Runtime("cuda:1", "bfloat16", True)),
        (MAC, {}, Runtime("cpu", "float32", False)),  # auto never picks the untested MPS
        (MAC, {"device": "mps"}, Runtime("mps", "float32", False)),
        (ONE_GPU, {"compile": "off"}, Runtime("cuda:0", "bfloat16", False)),
        (CPU, {"compile": "on", "dtype": "float32"}, Runtime("cpu", "float32", True)),
        (ONE_GPU, {"budget_s": 30.0}, Runtime("cuda:0", "bfloat16", False)),  # too short to pay for compiling
        (ONE_GPU, {"budget_s": 10 * COMPILE_COST["cuda"][0]}, Runtime("cuda:0", "bfloat16", True)),
        # the CPU compiles a run whose time budget repays the measured compile at the measured speed-up (bf16 ~3.5 min)
        (CPU_BF16, {"budget_s": 600.0}, Runtime("cpu", "bfloat16", True)),
        (CPU_BF16, {"budget_s": 120.0}, Runtime("cpu", "bfloat16", False)),  # `make demo`'s 2 minutes: eager
        (CPU_BF16, {"budget_s": 180.0}, Runtime("cpu", "bfloat16", False)),  # 3 minutes do not repay 42 s for 1.25x
        (CPU, {"budget_s": 600.0}, Runtime("cpu", "float32", True)),
        (CPU, {"budget_s": 300.0}, Runtime("cpu", "float32", False)),  # float32 gains less: 5 minutes do not repay it
        (CPU_BF16, {}, Runtime("cpu", "bfloat16", False)),  # a step or token budget: its length is unknown
        (NO_COMPILER, {"budget_s": 3600.0}, Runtime("cpu", "bfloat16", False)),  # inductor needs a C++ compiler
        (CPU_BF16, {"budget_s": 3600.0, "inference": True}, Runtime("cpu", "float32", False)),
        (CPU, {"compile": False}, Runtime("cpu", "float32", False)),  # a config.json written before "auto"
    ],
)
def test_the_choice_is_a_function_of_the_flags_and_the_machine(machine, flags, want):
    assert resolve(machine=machine, **flags) == want


def test_auto_under_torchrun_takes_the_local_ranks_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve(machine=OLD_GPU).device == "cuda:1"
    assert resolve("cuda", machine=OLD_GPU).device == "cuda:1"


@pytest.mark.parametrize(
    "machine, flags, message",
    [
        (CPU, {"device": "cuda"}, "no CUDA GPU"),
        (CPU, {"device": "mps"}, "no Apple MPS"),
        (ONE_GPU, {"device": "cuda:3"}, "cuda:0 to cuda:0"),
        (CPU, {"device": "tpu"}, "--device must be"),
        (CPU, {"dtype": "float16"}, "--dtype must be"),
        (CPU, {"compile": "maybe"}, "--compile must be"),
        (CPU, {"dtype": "int8"}, "for decoding on the CPU"),  # training
        (CPU, {"dtype": "int8", "inference": True}, "scoring computes in float32 or bfloat16"),
        (ONE_GPU, {"dtype": "int8", "decoding": True}, "on cuda:0 use bfloat16"),
    ],
)
def test_a_missing_device_or_a_bad_flag_is_a_clear_error(machine, flags, message):
    with pytest.raises(ConfigError, match=message):
        resolve(machine=machine, **flags)


def test_the_machine_here_is_described_truthfully():
    here = Machine.here()
    assert here.cuda == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert resolve(machine=here).device == ("cuda:0" if here.cuda else "cpu")


@pytest.mark.parametrize(
    "environ, allowed",
    [
        ({}, True),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, True),
        ({"ONEDNN_MAX_CPU_ISA": "avx512_core_bf16"}, True),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, False),  # an AVX512 Xeon without bfloat16
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
        ({"DNNL_MAX_CPU_ISA": "SSE41"}, False),  # the old name
        ({"ONEDNN_MAX_CPU_ISA": "ALL"}, True),
        ({"ONEDNN_MAX_CPU_ISA": "AVX99_FUTURE"}, True),  # unknown: newer than the list, not a cap below bfloat16
    ],
)
def test_a_onednn_cap_below_bfloat16_means_no_native_bfloat16(environ, allowed, monkeypatch):
    from gradlm.runtime import onednn_allows_bf16

    assert onednn_allows_bf16(environ) is allowed
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert Machine.here().cpu_bf16 is allowed
    assert resolve(machine=Machine.here()).dtype == ("bfloat16" if allowed else "float32")


def test_rng_state_round_trips_and_reads_the_old_bare_form():
    rt = Runtime("cpu")
    torch.manual_seed(3)
    state = rt.rng_state()
    a = torch.rand(5)
    torch.manual_seed(99)
    rt.set_rng_state(state)
    assert torch.equal(torch.rand(5), a)
    rt.set_rng_state(state["cpu"])  # checkpoints before the runtime kept the bare CPU state
    assert torch.equal(torch.rand(5), a)


def test_autocast_and_moving_batches_on_the_cpu():
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with Runtime("cpu", "bfloat16").autocast():
        assert (x @ w).dtype == torch.bfloat16
    with Runtime("cpu", "float32").autocast():
        assert (x @ w).dtype == torch.float32
    a, b = Runtime("cpu").to_device(x, w)
    assert a is x and b is w  # nothing to move
    assert Runtime("cpu").tensor([1.0, 2.0]).device.type == "cpu"


# ---- every command that runs a model takes the flags ------------------------------------------------------

MODEL_COMMANDS = ("train", "finetune", "lr-find", "compare", "generate", "chat", "eval", "serve", "merge")


def test_every_command_that_runs_a_model_takes_the_runtime_flags():
    from gradlm.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in MODEL_COMMANDS:
        flags = {o for a in sub.choices[name]._actions for o in a.option_strings}
        assert {"--device", "--dtype", "--compile"} <= flags, name


@pytest.fixture(scope="module")
def sharp_run(tmp_path_factory, tok):
    from conftest import sharp_model, write_run

    return write_run(tmp_path_factory.mktemp("rt") / "run", sharp_model(tok.vocab_size, n_kv_head=2), tok)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "command",
    [
        "generate {run} hi",
        "chat {run}",
        "eval {run} --data {text}",
        "serve {run} --port 0",
        "merge {run} --out {out}",
        "train --data {text} --out {out} --max-steps 2",
        "lr-find --data {text} --steps 10",
    ],
)
def test_a_device_this_machine_lacks_is_one_line_and_exit_2(command, sharp_run, text_file, tmp_path, capsys):
    from gradlm.cli import main

    out = tmp_path / "out"
    argv = command.format(run=sharp_run, text=text_file, out=out).split() + ["--device", "cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA GPU" in err and "Traceback" not in err, err
    assert not out.exists()


def test_int8_decoding_on_the_cpu_through_the_cli_and_the_api(sharp_run, tok, capsys):
    from gradlm.cli import main
    from gradlm.generation.generate import load
    from gradlm.model.infer import Forward
    from gradlm.runtime import resolve

    lm = load(sharp_run, runtime=resolve("cpu", "int8", decoding=True))
    assert lm.engine.forward.int8
    ids = torch.tensor([tok.encode("ROMEO: what light through yonder window breaks")])
    with torch.inference_mode():  # int8 copies of the matrices: the logits move by rounding, not more
        exact = Forward(lm.model)(ids, lm.model.new_cache(1, 64))
        rounded = lm.engine.forward(ids, lm.model.new_cache(1, 64))
    assert (rounded - exact).abs().max() < 0.05 * exact.abs().max()
    int8 = lm.complete("ROMEO:", temperature=0, max_new_tokens=24)[0]
    assert (
        main(["generate", str(sharp_run), "ROMEO:", "--temperature", "0", "--max-new-tokens", "24", "--dtype", "int8"])
        == 0
    )
    assert capsys.readouterr().out == int8.text + "\n"
    # --dtype auto decodes in int8 where ATen runs AVX512 (its weight-only kernel is vectorised), float32 elsewhere
    exact = load(sharp_run).complete("ROMEO:", temperature=0, max_new_tokens=24)[0]
    assert main(["generate", str(sharp_run), "ROMEO:", "--temperature", "0", "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out == (int8 if Machine.here().cpu_int8 else exact).text + "\n"
    assert main(["eval", str(sharp_run), "--data", "x", "--dtype", "int8"]) == 2
    assert "scoring computes in float32 or bfloat16" in capsys.readouterr().err


def test_eval_reports_where_it_ran_and_bfloat16_weights_score_close_to_float32(sharp_run, text_file, capsys):
    import json

    from gradlm.cli import main

    figures = {}
    for dtype in ("float32", "bfloat16"):
        assert (
            main(["eval", str(sharp_run), "--data", str(text_file), "--json", "--device", "cpu", "--dtype", dtype]) == 0
        )
        report = json.loads(capsys.readouterr().out)
        assert (report["device"], report["dtype"]) == ("cpu", dtype)
        figures[dtype] = report["clean"]["bits_per_byte"]
    assert figures["bfloat16"] == pytest.approx(figures["float32"], rel=0.02)


# ---- the CUDA branches, forced on the CPU ------------------------------------------------------------------


def test_batches_for_cuda_go_pinned_and_without_blocking(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t: False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **kw: calls.append((a, kw)) or t)
    Runtime("cuda:1").to_device(torch.zeros(2), torch.ones(2))
    assert calls == ["pin", (("cuda:1",), {"non_blocking": True})] * 2
    calls.clear()
    Runtime("cpu").to_device(torch.zeros(2))
    assert calls == [(("cpu",), {})]


def test_fused_adamw_updates_as_the_plain_one():
    from gradlm.model.transformer import Transformer
    from gradlm.training.optim import build_optimizer

    from conftest import tiny_config

    torch.manual_seed(0)  # the weights, not whatever the tests before left in the generator
    models = [Transformer(tiny_config(64)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(m, "adamw", 1e-2, fused=f) for m, f in zip(models, (False, True))]
    assert opts[1].defaults["fused"] and not opts[0].defaults["fused"]
    x = torch.randint(0, 64, (4, 16))
    for m, opt in zip(models, opts):
        for _ in range(3):
            m(x, x).backward()
            opt.step()
            opt.zero_grad()
    # the same arithmetic in another order: rounding apart (Adam's m / sqrt(v) magnifies it where a gradient is tiny:
    # up to 2e-6 over 60 seeds on an AMD EPYC, where 1e-6 failed one seed in 60), far below one update (lr 1e-2)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_a_training_step_reads_the_device_once(prepared, tmp_path, tok, monkeypatch):
    from gradlm.training.config import TrainConfig
    from gradlm.training.trainer import Trainer

    from conftest import tiny_config

    t = Trainer(
        tiny_config(tok.vocab_size),
        TrainConfig(
            data=str(prepared), out=str(tmp_path / "run"), batch="8", accum=2, max_steps=5, progress=False, plots=False
        ),
    ).build()
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _real=real, _name=name: reads.append(_name) or _real(self, *a)
        )
    t.model.train()
    loss, norm = t.gradients()
    assert reads == ["tolist"] and loss > 0 and norm > 0
