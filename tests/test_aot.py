"""The compiled decoding step (gradlm/model/aot.py): the eager path's logits and keys at every position of the window,
for one row and for a batch with left padding, for any weights of the shape it was built for; the same tokens inside
the engine (rows joining and leaving, the window sliding, a conversation's cache); built once per shape, in the
background too; a failed build decodes eagerly after one warning, leaving nothing half-written."""

from __future__ import annotations

import pytest
import torch

from gradlm.generation.engine import Engine, Request
from gradlm.model import aot, infer
from gradlm.model.infer import Forward, decode, fused_forward, inference_weights
from gradlm.model.sampling import SamplingConfig
from gradlm.runtime import Runtime

from conftest import sharp_model, write_run

SHAPE = dict(n_kv_head=2, qk_norm=True)  # grouped-query attention and QK-norm: every branch of the step


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("aot-cache")


@pytest.fixture
def aot_cache(shared_cache, monkeypatch):
    """One cache for the module's tests (each form of SHAPE is built once), not every test's own."""
    monkeypatch.setenv("GRADLM_CACHE", str(shared_cache))
    return shared_cache


@pytest.fixture
def calls(monkeypatch) -> list:
    """One item per token the compiled step decodes."""
    counted, real = [], aot.CompiledStep.__call__

    def counting(step, ids, cache):
        counted.append(1)
        return real(step, ids, cache)

    monkeypatch.setattr(aot.CompiledStep, "__call__", counting)
    return counted


def same_as_eager(model, step, tol: float, length: int | None = None, prompts=([1, 2, 3, 4, 5],)) -> None:
    """The step's logits and keys/values equal fused_forward's at every position of a cache of `length` (default:
    the window) up to its end, for rows of these prompts (left-padded in one cache when their lengths differ)."""
    w = inference_weights(model, step.int8)
    block, P = length or model.cfg.block_size, max(map(len, prompts))
    pad = [P - len(p) for p in prompts]
    ids = torch.tensor([[0] * n + p for n, p in zip(pad, prompts)])
    ours, theirs = (model.new_cache(len(prompts), block, pad=pad if any(pad) else None) for _ in range(2))
    with torch.inference_mode():
        fused_forward(model, w, ids, ours, True)
        fused_forward(model, w, ids, theirs, True)
        ids = torch.tensor([[7 + b] for b in range(len(prompts))])
        while ours.pos < block:
            assert step.fits(ids, ours)
            want, got = fused_forward(model, w, ids, theirs, False), step(ids, ours)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            torch.testing.assert_close(ours.kv[..., : ours.pos, :], theirs.kv[..., : theirs.pos, :], rtol=tol, atol=tol)
            ids = want[:, -1].argmax(-1, keepdim=True)


BATCH = ([1, 2, 3, 4, 5], [6, 7], [8, 9, 10])  # three rows of different lengths


class _Recorded:
    """A package loader that notes its form each time it runs."""

    def __init__(self, form, loader, ran):
        self.form, self.loader, self.ran = form, loader, ran

    def boxed_run(self, args):
        self.ran.append(self.form)
        return self.loader.boxed_run(args)


def recording(step) -> list:
    """The forms of the packages step runs, call by call, from now on."""
    ran = []
    step.parts = [(form, rows, _Recorded(form, loader, ran)) for form, rows, loader in step.parts]
    return ran


def test_a_float32_step_opens_without_its_few_row_package(aot_cache, tok, monkeypatch):
    """A cache from before the tuned package (or one still building): the package of ATen's products takes every
    batch meanwhile, and the background build makes only what is missing. (First in the module: it builds both
    float32 packages, which the tests after it find in the module's cache.)"""
    model = sharp_model(tok.vocab_size, **SHAPE)
    lines = []
    with monkeypatch.context() as patched:
        patched.setattr(aot, "forms", lambda int8: [("float32-aten", aot.MAX_ROWS)])
        assert aot.open_step(model, inference_weights(model), False, say=lines.append) is not None
    assert len(lines) == 1 and lines[0].startswith("compiling the decoding step (2 x 32, float32-aten): ")
    assert str(aot_cache) in lines[0]
    step = aot.open_step(model, inference_weights(model), False, build_missing=False)
    assert step is not None and step.forms == ["float32-aten"] and step.max_rows == aot.MAX_ROWS
    same_as_eager(model, step, 1e-4, length=12)
    lines.clear()
    process = aot.build_in_background(model.cfg, False, say=lines.append)
    assert process is not None and len(lines) == 1  # only the missing package
    assert lines[0].startswith("compiling the decoding step (2 x 32, float32) in the background")
    assert str(aot_cache) in lines[0]
    assert process.wait(timeout=300) == 0
    assert aot.open_step(model, inference_weights(model), False, build_missing=False).forms == [
        "float32",
        "float32-aten",
    ]


def test_weights_in_inductors_blocks_are_made_from_each_models_own(aot_cache, monkeypatch):
    """With inductor's GEMM template chosen for every weight's product (TUNED times it against ATen's, so which
    products take it depends on the machine): the package names each weight the template put in blocks after its
    matrix, and load() makes the blocks from the model's weights, a vocabulary the block does not divide padded with
    zeros."""
    only = "cpp|bmm"  # of the choices timed, the template's for the weights' products (ATen's for attention's)
    monkeypatch.setattr(aot, "TUNED", aot.TUNED | {"test_configs.autotune_choice_name_regex": only})
    monkeypatch.setattr(aot, "package_path", lambda cfg, form: aot_cache / "cpp-only" / f"{form}.pt2")
    monkeypatch.setattr(aot, "forms", lambda int8: [("float32", aot.MAX_ROWS)])  # (the tuned package alone)
    model = sharp_model(330, n_layer=1, **SHAPE)  # (one layer: a quicker build)
    step = aot.open_step(model, inference_weights(model), False, say=lambda line: None)
    assert step is not None and step.forms == ["float32"]
    blocked = {name.partition(aot.BLOCKS)[0]: t for name, t in step.consts["float32"].items() if aot.BLOCKS in name}
    assert set(blocked) == {"l0_qkv", "l0_o", "l0_gu", "l0_down", "head"}
    assert blocked["head"].shape[0] * blocked["head"].shape[2] > 330  # padded to whole blocks
    other = sharp_model(330, n_layer=1, seed=1, **SHAPE)
    again = aot.open_step(other, inference_weights(other), False, build_missing=False)
    same_as_eager(other, again, 1e-4, length=19)
    same_as_eager(other, again, 1e-4, length=12, prompts=BATCH)
    # a package with a constant no weight makes is refused after its build (which then builds it untuned)
    package = aot.package_path(model.cfg, "float32")
    aot._names_known(model.cfg, "float32", package)
    real = aot.layout
    monkeypatch.setattr(aot, "layout", lambda cfg, form: {k: v for k, v in real(cfg, form).items() if k != "head"})
    with pytest.raises(RuntimeError, match="a constant 'head__blocks"):
        aot._names_known(model.cfg, "float32", package)


@pytest.mark.parametrize("n_out", [48, 330], ids=["in-blocks", "padded"])
@pytest.mark.parametrize("block", [16, 32])
def test_a_matrix_in_blocks_holds_its_columns_in_order_and_zeros_after(n_out, block):
    g = torch.Generator().manual_seed(0)
    w, a = torch.randn(40, n_out, generator=g), torch.randn(3, 40, generator=g)
    blocked = aot._blocked(w, block)
    assert blocked.shape == (-(-n_out // block), 40, block) and blocked.is_contiguous()
    columns = blocked.permute(1, 0, 2).reshape(40, -1)
    assert torch.equal(columns[:, :n_out], w) and not columns[:, n_out:].any()
    torch.testing.assert_close(torch.einsum("bk,nkj->bnj", a, blocked).reshape(3, -1)[:, :n_out], a @ w)


def test_the_step_gives_the_eager_logits_at_every_position_for_any_weights_of_its_shape(aot_cache, tok):
    model = sharp_model(tok.vocab_size, **SHAPE)
    forms = ["float32", "float32-aten"]  # tuned up to tuned_rows() rows, and the rest
    missing = [form for form in forms if not aot.package_path(model.cfg, form).exists()]  # (the module's cache)
    lines = []
    step = aot.open_step(model, inference_weights(model), False, say=lines.append)
    assert step is not None and step.forms == forms and step.max_rows == aot.MAX_ROWS
    assert len(lines) == len(missing)  # one line for each package built
    for line, form in zip(lines, missing):
        assert line.startswith(f"compiling the decoding step (2 x 32, {form}): ") and str(aot_cache) in line
    same_as_eager(model, step, 1e-4)
    # another model of the shape: the package is found (not built again) and computes with that model's weights
    other = sharp_model(tok.vocab_size, seed=1, **SHAPE)
    again = aot.open_step(other, inference_weights(other), False, build_missing=False, say=lines.append)
    assert again is not None and len(lines) == len(missing)
    ran = recording(again)
    same_as_eager(other, again, 1e-4, length=19)  # the same graph for a cache of any length
    same_as_eager(other, again, 1e-4, prompts=BATCH)  # and for a batch of rows, left-padded
    assert set(ran) == {"float32"}  # 1 and 3 rows: the tuned package
    ran.clear()
    same_as_eager(other, again, 1e-4, length=12, prompts=BATCH * 6)  # more rows than tuned_rows(): the other one
    assert set(ran) == {"float32-aten"}
    assert not step.fits(torch.tensor([[1, 2]]), model.new_cache(1, 32))  # more than one token: eager
    one = model.new_cache(1, 32)
    one.pos = 1
    assert not step.fits(torch.tensor([[1]]), one)  # after a one-token prompt: one eager step first


def test_float32_decoding_through_the_step_is_the_module_paths_greedy_tokens(aot_cache, tok):
    model = sharp_model(tok.vocab_size, **SHAPE)
    cfg = SamplingConfig(temperature=0, max_new_tokens=28)
    forward = Forward(model, step="build")
    # every new token after the prompt's goes through the compiled step, up to the end of the window
    got = decode(model, [1, 2, 3, 4], 28, cfg, forward=forward)
    assert forward.step is not None
    assert got == decode(model, [1, 2, 3, 4], 28, cfg)  # the module path, GPT.forward
    # weights changed in place (training, load_state_dict): check() hands the step the new ones
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    forward.check()
    assert decode(model, [1, 2, 3, 4], 28, cfg, forward=forward) == decode(model, [1, 2, 3, 4], 28, cfg)
    model.to(torch.bfloat16)  # weights the package was not built for (it reads them in place): eager from now on
    forward.check()
    assert forward.step is None and forward.step_mode == "off"


def test_the_int8_step_built_in_the_background_gives_the_eager_int8_logits(aot_cache, tok, monkeypatch):
    model = sharp_model(tok.vocab_size, **SHAPE)
    process = aot.build_in_background(model.cfg, True, say=lambda line: None)
    assert process is not None and process.wait(timeout=300) == 0
    assert aot.build_in_background(model.cfg, True) is None  # there now: nothing to build
    step = aot.open_step(model, inference_weights(model, True), True, build_missing=False)
    assert step.forms == ["int8"] and step.max_rows == aot.int8_rows()  # 4 rows with one thread, 16 with more
    # the eager int8 path and the step both multiply bf16 activations; they round the norms differently
    same_as_eager(model, step, 2e-2)
    same_as_eager(model, step, 2e-2, prompts=BATCH)
    if step.max_rows >= 6:  # two threads or more: the step takes rows the eager path quantizes dynamically
        monkeypatch.setattr(infer, "WEIGHT_ONLY_ROWS", 16)  # (compared with the eager weight-only product)
        same_as_eager(model, step, 2e-2, length=12, prompts=BATCH * 2)


def test_the_engine_gives_the_same_tokens_with_the_step_as_without(aot_cache, tok, calls):
    model = sharp_model(tok.vocab_size, **SHAPE)
    eager = Engine(model, tok, runtime=Runtime("cpu", "float32"))
    compiled = Engine(model, tok, runtime=Runtime("cpu", "float32", decode_step="build"))
    greedy = SamplingConfig(temperature=0, max_new_tokens=70)
    sampled = SamplingConfig(temperature=0.8, seed=3, max_new_tokens=20)
    requests = [
        Request(tok.encode("ROMEO:"), greedy, slide=True),  # 70 new tokens in a window of 32: the row slides
        Request(tok.encode("JULIET: what"), SamplingConfig(temperature=0, max_new_tokens=5)),  # leaves early
        Request(tok.encode("NURSE:"), sampled, n=2),
    ]
    want = [[p.token.id for p in pieces] for pieces in eager.run(requests)]
    assert [[p.token.id for p in pieces] for pieces in compiled.run(requests)] == want
    for r in requests:  # one row at a time too
        (alone,) = compiled.run([r])
        assert [p.token.id for p in alone] == [p.token.id for p in eager.run([r])[0]]
    assert len(calls) > 70


def test_a_step_that_fails_to_build_decodes_eagerly_after_one_warning_and_leaves_nothing(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("GRADLM_CACHE", str(tmp_path))

    def half_written(program, package_path, inductor_configs):
        with open(package_path, "wb") as f:
            f.write(b"PK half a package")
        raise RuntimeError("g++ failed\nwith more detail")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", half_written)
    model = sharp_model(tok.vocab_size)
    cfg = SamplingConfig(temperature=0, max_new_tokens=28)
    lines = []
    monkeypatch.setattr(aot, "_said", lambda say: lines.append)
    forward = Forward(model, step="build")
    assert decode(model, [1, 2, 3, 4], 28, cfg, forward=forward) == decode(model, [1, 2, 3, 4], 28, cfg)
    forward.check()  # not tried again
    assert forward.step is None and forward.step_mode == "off"
    assert lines == [
        "warning: compiling the decoding step failed (RuntimeError: g++ failed); decoding without it "
        "(--compile off skips the attempt)"
    ]
    assert list((tmp_path / "aot").iterdir()) == []  # nothing half-written


def test_a_tuned_build_that_fails_builds_untuned_and_says_so_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRADLM_CACHE", str(tmp_path))
    real = torch._inductor.aoti_compile_and_package

    def no_tuning(program, package_path, inductor_configs):
        if inductor_configs.get("max_autotune"):
            raise RuntimeError("no template here\nmore")
        return real(program, package_path=package_path, inductor_configs=inductor_configs)

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_tuning)
    monkeypatch.setattr(aot, "forms", lambda int8: [("float32", aot.MAX_ROWS)])
    model = sharp_model(330, n_layer=1)
    lines = []
    step = aot.open_step(model, inference_weights(model), False, say=lines.append)
    assert step is not None and not any(aot.BLOCKS in name for name in step.consts["float32"])
    assert lines[0] == (
        "warning: tuning the decoding step (1 x 32, float32) failed (RuntimeError: no template here); its products "
        "are ATen's"
    )
    assert len(lines) == 2 and lines[1].startswith("compiling the decoding step (1 x 32, float32): ")
    same_as_eager(model, step, 1e-4, length=12, prompts=BATCH)
    # weights that cannot be handed over (here: a failure inside the package's loader): eager, after one line
    forward = Forward(model, step="build")
    forward.check()
    assert forward.step is not None

    def refuse(step, model, weights):
        raise RuntimeError("loader said no")

    monkeypatch.setattr(aot.CompiledStep, "load", refuse)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    forward.check()
    assert forward.step is None and forward.step_mode == "off"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "warning: the compiled decoding step could not take the new weights (RuntimeError: loader said no); "
        "decoding without it"
    )


@pytest.mark.parametrize("threads", [1, 2])
def test_a_step_is_one_package_taking_the_rows_measured_for_its_threads(monkeypatch, threads):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert aot.forms(False) == [("float32", 16 if threads > 1 else 8), ("float32-aten", 64)]
    assert aot.forms(True) == [("int8", 16 if threads > 1 else 4)]


def test_a_step_compiles_tuned_with_a_1_row_batch_shared_among_threads_and_untuned_if_that_fails(
    tmp_path, monkeypatch, tok
):
    """A build's example batch has neither as many rows as threads nor twice as many (3, or 2 with 1 and 3 threads:
    else a 1-row batch ran on one thread). A float32 build is tuned, and built again untuned when that fails; torch's
    method that _blocks_named replaces is put back either way."""
    from torch._inductor.graph import GraphLowering

    add, seen = GraphLowering.add_tensor_constant, []

    def stop(program, package_path, inductor_configs):
        rows = program.example_inputs[0][0].shape[0]
        seen.append((rows, inductor_configs.get("max_autotune", False)))
        raise RuntimeError("stopped before compiling")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", stop)
    cfg = sharp_model(tok.vocab_size).cfg
    for threads, form in ((2, "float32"), (1, "float32"), (2, "float32-aten"), (3, "int8"), (96, "int8")):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        with pytest.raises(RuntimeError, match="stopped"):
            aot.build(cfg, form, tmp_path / f"{form}.pt2")
    assert seen == [(3, True), (3, False), (2, True), (2, False), (3, False), (2, False), (3, False)]
    assert GraphLowering.add_tensor_constant is add
    assert list(tmp_path.iterdir()) == []


def test_generate_with_compile_on_writes_the_text_it_writes_without(aot_cache, tok, tmp_path, capsys, calls):
    from gradlm.cli import main

    run = write_run(tmp_path / "run", sharp_model(tok.vocab_size, **SHAPE), tok)
    args = ["generate", str(run), "ROMEO:", "--temperature", "0", "--max-new-tokens", "20", "--dtype", "float32"]
    assert main([*args, "--compile", "off"]) == 0
    assert not calls
    eager = capsys.readouterr().out
    assert main([*args, "--compile", "on"]) == 0
    assert capsys.readouterr().out == eager and len(calls) >= 19


def test_a_conversation_that_keeps_its_cache_decodes_the_same_with_the_step(aot_cache, tok, calls):
    """What a chat does: each turn continues the previous turn's KV cache (Request.cache)."""
    model = sharp_model(tok.vocab_size, **SHAPE)
    engines = {
        "eager": Engine(model, tok, runtime=Runtime("cpu", "float32")),
        "compiled": Engine(model, tok, runtime=Runtime("cpu", "float32", decode_step="build")),
    }
    said = {}
    for name, engine in engines.items():
        cache, ids, replies = model.new_cache(1, 32), tok.encode("ROMEO:"), []
        for more in ("JULIET:", "NURSE: good"):
            (pieces,) = engine.run([Request(ids, SamplingConfig(temperature=0, max_new_tokens=6), cache=cache)])
            replies.append([p.token.id for p in pieces])
            ids = ids + replies[-1] + tok.encode(more)
        said[name] = replies, cache.kv[..., : cache.pos, :].clone()
    assert said["compiled"][0] == said["eager"][0] and len(calls) >= 8
    torch.testing.assert_close(said["compiled"][1], said["eager"][1], rtol=1e-4, atol=1e-4)
