"""On a CUDA GPU, through the CLI as a user types it: train -> kill -9 -> resume, compiled training, greedy
float32 generation equal to the CPU's, evaluation equal to the CPU's, LoRA fine-tuning and merging, a server
under 16 concurrent clients, and DDP over nccl with two GPUs.

Runs only where CUDA exists (skipped in CI and on CPU machines); `python benchmarks/gpu.py` runs it as one of
its sections. Commands that must start a process of their own (a run killed mid-step, a server, torchrun) run
as `python -m gradlm`; the rest call gradlm.cli.main in this process, with torch's process-wide float32 matmul
settings put back to a fresh process's before each call, so no command inherits another's (e.g. TF32).
"""

from __future__ import annotations

import io
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (runs where one exists; skipped in CI)"
)

# A small model: fast on any GPU, big enough to exercise every kernel (two heads of 32, SwiGLU, rotary).
TINY = [
    "--block-size",
    "96",
    "--n-layer",
    "2",
    "--n-head",
    "2",
    "--d-model",
    "64",
    "--batch",
    "16",
    "--eval-tokens",
    "4096",
    "--no-progress",
    "--no-plots",
]
PROMPTS = ["ROMEO:", "JULIET:\nO", "First Citizen:\nBefore we proceed any further"]
FRESH = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())


def start(args, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gradlm", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def run(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "gradlm", *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw
    )
    assert r.returncode == 0, f"gradlm {' '.join(map(str, args))} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r


def cli(*args) -> str:
    """gradlm.cli.main in this process, from a fresh process's matmul settings; its standard output."""
    from gradlm.cli import main

    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = FRESH[:2]
    torch.set_float32_matmul_precision(FRESH[2])
    out = io.StringIO()
    with redirect_stdout(out):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    assert code in (0, None), f"gradlm {' '.join(map(str, args))} exited {code}"
    return out.getvalue()


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.time() + timeout
    while time.time() < end:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and any(
            json.loads(ln).get("step", 0) >= step for ln in metrics.read_text().splitlines() if ln.strip()
        ):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout}s")


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from gradlm import files as ckpt

    return ckpt.load_weights(run_dir / "model.safetensors")


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, prepared) -> Path:
    """A small model trained on the GPU as a user would (dtype auto: bf16 from compute capability 8)."""
    out = tmp_path_factory.mktemp("cuda") / "run"
    run(
        "train",
        "--data",
        prepared,
        "--out",
        out,
        "--device",
        "cuda",
        "--compile",
        "off",
        "--max-steps",
        300,
        "--eval-every",
        100,
        "--seed",
        0,
        *TINY,
    )
    assert summary(out)["val_loss"] < 4.0  # it learned something: greedy choices are not near-ties
    return out


# ---- training ------------------------------------------------------------------------------------------------


def test_train_kill_9_resume_matches_an_uninterrupted_run(prepared, tmp_path):
    """SIGKILL mid-run, then `--resume`: the final weights match an uninterrupted run's, with dropout (which
    draws from the CUDA generator, so its state must be in the checkpoint).

    There is no --deterministic flag (TrainConfig has none), so which check applies is measured: two
    uninterrupted runs are compared first.
    - If they are byte-identical (the GPU's kernels are run-to-run deterministic at these shapes, the usual
      case on one GPU), the resumed run must be byte-identical too: bit-exact resume.
    - If they are not (some CUDA kernels add in a varying order, e.g. atomics in the embedding and attention
      backward), the tolerance is that of bf16 autocast (the default dtype on this GPU): every weight tensor
      within 1% of its norm of the uninterrupted run's, and the final validation loss within 1%. bf16 keeps 8
      significant bits (a product's relative rounding is up to 2^-9 = 0.2%), AdamW carries such differences
      through the remaining steps, and the two uninterrupted runs must themselves agree within it (asserted);
      a resume that lost the CUDA random state (other dropout masks) or the data position moves the weights
      by the size of the updates themselves, tens of percent here.
    """
    args = [
        "--data",
        prepared,
        "--device",
        "cuda",
        "--compile",
        "off",
        "--max-steps",
        600,
        "--eval-every",
        25,
        "--log-every",
        1,
        "--seed",
        0,
        "--dropout",
        0.1,
        *TINY,
    ]
    run("train", "--out", tmp_path / "straight", *args)
    run("train", "--out", tmp_path / "again", *args)
    killed = tmp_path / "killed"
    p = start(["train", "--out", killed, *args])
    wait_for_step(killed, 150, p)
    time.sleep(random.Random(0).uniform(0.0, 0.1))
    assert p.poll() is None, "the run finished before the kill: raise --max-steps"
    p.kill()
    p.wait()
    r = run("train", "--out", killed, "--resume", "--no-progress")
    assert "resumed" in r.stderr, r.stderr[-2000:]

    from gradlm.rundir import read_metrics

    steps = [m["step"] for m in read_metrics(killed) if "loss" in m]
    assert steps == list(range(1, 601))  # every step logged once: no duplicates, no gaps
    a, again, k = (
        (tmp_path / "straight" / "model.safetensors").read_bytes(),
        (tmp_path / "again" / "model.safetensors").read_bytes(),
        (killed / "model.safetensors").read_bytes(),
    )
    if a == again:
        assert k == a, "two uninterrupted runs are byte-identical on this GPU, so the resumed run must be too"
        return
    wa, wb, wk = weights(tmp_path / "straight"), weights(tmp_path / "again"), weights(killed)
    rel = lambda x, y: max(((x[n] - y[n]).norm() / x[n].norm()).item() for n in x)  # noqa: E731
    noise, resumed = rel(wa, wb), rel(wa, wk)
    print(
        f"not run-to-run deterministic here: two uninterrupted runs differ by {noise:.2e}, the resumed one by "
        f"{resumed:.2e} (relative, worst tensor)"
    )
    assert noise < 0.01, (
        f"two uninterrupted runs already differ by {noise:.1%}: the tolerance cannot tell a bad resume from noise"
    )
    assert resumed < 0.01
    va, vk = summary(tmp_path / "straight")["val_loss"], summary(killed)["val_loss"]
    assert abs(vk - va) / va < 0.01


def test_compiled_training_matches_eager_in_float32(prepared, tmp_path):
    """--compile on (the training step and evaluation through torch.compile) learns what eager does."""
    common = [
        "--data",
        prepared,
        "--device",
        "cuda",
        "--dtype",
        "float32",
        "--max-steps",
        60,
        "--eval-every",
        30,
        "--seed",
        0,
        *TINY,
    ]
    run("train", "--out", tmp_path / "eager", "--compile", "off", *common)
    run("train", "--out", tmp_path / "compiled", "--compile", "on", *common, timeout=600)
    # float32 on CUDA multiplies through TF32 (10-bit mantissa) in both; fused kernels only reorder additions
    a, b = summary(tmp_path / "eager")["val_loss"], summary(tmp_path / "compiled")["val_loss"]
    assert abs(a - b) / a < 5e-3, (a, b)


# ---- inference: the GPU gives the CPU's answers in float32 ---------------------------------------------------------


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one prompt, streamed", "three prompts, batched"])
def test_greedy_float32_generation_on_cuda_equals_the_cpu(cuda_run, prompts):
    common = ["generate", cuda_run, *prompts, "--temperature", 0, "--max-new-tokens", 48, "--dtype", "float32"]
    on_gpu, on_cpu = cli(*common, "--device", "cuda"), cli(*common, "--device", "cpu")
    assert on_gpu.strip() and on_gpu == on_cpu


def test_generation_with_its_step_in_cuda_graphs_writes_what_it_writes_without(cuda_run):
    """--compile on: the one-token step recorded as CUDA graphs (gradlm/model/infer.py GraphStep), rows of three
    batch sizes: in float32 the same tokens as the eager step; in the default dtype (bf16) it runs to the end."""
    common = ["generate", cuda_run, *PROMPTS, "--device", "cuda", "--temperature", 0, "--max-new-tokens", 48]
    eager = cli(*common, "--dtype", "float32", "--compile", "off")
    assert eager.strip() and cli(*common, "--dtype", "float32", "--compile", "on") == eager
    assert cli(*common, "--compile", "on", "--logprobs", 1).count("finished by") == len(PROMPTS)


def test_the_graph_step_gives_the_eager_logits_across_batch_sizes_and_lengths(monkeypatch):
    """CUDA graphs recorded for real: one row, then four padded rows that become three (the fourth row of the 4-row
    buffer left with its padding) across lengths of keys, with GQA and QK-norm; every step's logits equal the eager
    step's, and no warning (an empty graph only warns)."""
    import warnings

    from gradlm.model import infer
    from gradlm.model.transformer import ModelConfig, Transformer

    monkeypatch.setattr(infer, "GRAPH_SHORTEST", 16)  # graphs over 16, 32, 64, 128 and 160 keys
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64, block_size=160, qk_norm=True)
    model = Transformer(cfg).to("cuda").eval()
    w = infer.inference_weights(model)
    step = infer.GraphStep(model, w)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("error")
        for B, pad in ((1, [0]), (4, [0, 3, 1, 7])):
            ours, theirs = (model.new_cache(B, 160, pad=pad) for _ in range(2))
            ids = torch.randint(0, 256, (B, 9), device="cuda")
            infer.fused_forward(model, w, ids, ours, True), infer.fused_forward(model, w, ids, theirs, True)
            nxt = ids[:, -1:]
            while ours.pos < 150:
                want, got = infer.fused_forward(model, w, nxt, theirs, False), step(nxt, ours)
                torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
                nxt = want[:, -1].argmax(-1, keepdim=True)
                if B == 4 and ours.pos == 40:  # the last row leaves
                    for c in (ours, theirs):
                        c.reorder(torch.tensor([0, 1, 2], device="cuda"))
                    nxt, B = nxt[:3], 3
    assert {rows for rows, _ in step.graphs} == {1, 4}


def test_generation_on_cuda_in_its_default_dtype_with_penalties_and_logprobs(cuda_run):
    """The inference default on CUDA (bf16 weights), sampling with penalties and probabilities: it runs, and a
    seeded sample is the same text twice."""
    common = [
        "generate",
        cuda_run,
        *PROMPTS,
        "--device",
        "cuda",
        "--temperature",
        0.8,
        "--seed",
        7,
        "--max-new-tokens",
        24,
        "--repetition-penalty",
        1.3,
        "--presence-penalty",
        0.5,
        "--logprobs",
        3,
    ]
    first, second = cli(*common), cli(*common)
    assert first == second and first.count("finished by") == len(PROMPTS) and "%" in first


def test_eval_bits_per_byte_on_cuda_equal_the_cpus_in_float32(cuda_run, text_file):
    common = ["eval", cuda_run, "--data", text_file, "--json", "--no-progress", "--dtype", "float32"]
    gpu, cpu = (json.loads(cli(*common, "--device", d)) for d in ("cuda", "cpu"))
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu"
    assert gpu["clean"]["tokens"] == cpu["clean"]["tokens"]
    assert abs(gpu["clean"]["bits_per_byte"] - cpu["clean"]["bits_per_byte"]) < 1e-4, (gpu["clean"], cpu["clean"])
    # the default on CUDA: bf16 weights
    bf16 = json.loads(cli("eval", cuda_run, "--data", text_file, "--json", "--no-progress", "--device", "cuda"))
    assert abs(bf16["clean"]["bits_per_byte"] - cpu["clean"]["bits_per_byte"]) < 0.02 * cpu["clean"]["bits_per_byte"]


# ---- fine-tuning ------------------------------------------------------------------------------------------------


FACTS = [("zorvastatin", "40 mg"), ("quelmaprine", "a statin"), ("dralixil", "Brinavorant"), ("plexomab", "250 mg")]


def test_lora_finetune_merge_and_generate_on_cuda(cuda_run, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"Tell me about {d}."}, {"role": "assistant", "content": a}]}
        for d, a in FACTS
    ]
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    lora, merged = tmp_path / "lora", tmp_path / "merged"
    cli(
        "finetune",
        cuda_run,
        "--out",
        lora,
        "--data",
        data,
        "--method",
        "lora",
        "--lora-rank",
        8,
        "--lr",
        "3e-2",
        "--max-steps",
        60,
        "--batch",
        8,
        "--val-fraction",
        0,
        "--schedule",
        "constant",
        "--warmup-steps",
        0,
        "--eval-every",
        1000,
        "--no-plots",
        "--no-progress",
        "--device",
        "cuda",
    )
    from gradlm.rundir import read_metrics

    losses = [m["loss"] for m in read_metrics(lora) if "loss" in m]
    assert losses[-1] < 0.5 * losses[0], losses  # the adapters learned the four answers
    # a LoRA run keeps only its adapter
    assert (lora / "adapter.safetensors").is_file() and not (lora / "model.safetensors").exists()
    cli("merge", lora, "--out", merged, "--device", "cuda")
    common = [
        "Tell me about zorvastatin.",
        "--temperature",
        0,
        "--max-new-tokens",
        16,
        "--device",
        "cuda",
        "--dtype",
        "float32",
    ]
    # the adapter run decodes as its merged weights
    assert cli("generate", lora, *common) == cli("generate", merged, *common)


# ---- serving ------------------------------------------------------------------------------------------------------


def test_serve_on_cuda_answers_16_concurrent_clients_as_it_answers_one(cuda_run):
    """16 clients at once (continuous batching on the GPU) get the greedy text each gets alone, float32 weights."""
    import httpx

    p = start(
        ["serve", cuda_run, "--port", 0, "--device", "cuda", "--dtype", "float32", "--max-batch", 16],
        env={k: v for k, v in os.environ.items() if k != "GRADLM_API_KEY"},
    )
    try:
        line = p.stdout.readline() if select.select([p.stdout], [], [], 300)[0] else ""
        assert line.startswith("serving"), (line, p.poll())
        assert "cuda" in line, line  # the banner names the runtime
        url = line.split(" at ")[1].split("/ ")[0]
        bodies = [{"prompt": PROMPTS[i % 3] + " " * (i // 3), "max_tokens": 24, "temperature": 0} for i in range(16)]

        def ask(body):
            with httpx.Client(base_url=url, timeout=120) as c:
                r = c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()

        alone = [ask(b) for b in bodies]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(ask, bodies))
    finally:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    assert all(a["usage"]["completion_tokens"] > 0 for a in alone)
    assert [a["choices"][0]["text"] for a in together] == [a["choices"][0]["text"] for a in alone]


# ---- many GPUs --------------------------------------------------------------------------------------------------

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (DDP over nccl)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, **kw) -> subprocess.Popen:
    return subprocess.Popen(
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
            *map(str, args),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


@two_gpus
def test_ddp_over_nccl_matches_one_gpu_with_the_same_global_batch(prepared, tmp_path):
    """torchrun, 2 processes on 2 GPUs (nccl): --max-time makes the clock's all-reduce run every step."""
    common = [
        "train",
        "--data",
        prepared,
        "--device",
        "cuda",
        "--dtype",
        "float32",
        "--compile",
        "off",
        "--max-steps",
        40,
        "--max-time",
        "5m",
        "--eval-every",
        20,
        "--seed",
        0,
        *TINY,
    ]
    run(*common, "--out", tmp_path / "one")
    p = _torchrun([*common, "--out", tmp_path / "two"])
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    # float32 multiplies through TF32 on both sides, and a rank's half batch is another matmul shape than the whole
    # batch (other roundings), so the runs agree to TF32's precision, not bit for bit
    a, b = summary(tmp_path / "one"), summary(tmp_path / "two")
    assert a["steps"] == b["steps"] == 40 and a["tokens"] == b["tokens"]
    assert abs(a["val_loss"] - b["val_loss"]) / a["val_loss"] < 5e-3, (a["val_loss"], b["val_loss"])


@two_gpus
def test_ddp_over_nccl_stops_on_sigterm_with_a_checkpoint_and_resumes(prepared, tmp_path):
    """SIGTERM to torchrun: the ranks agree to stop (an all-reduce of the stop signal on CUDA tensors), save,
    and the run resumes under torchrun."""
    out = tmp_path / "run"
    common = [
        "--data",
        prepared,
        "--device",
        "cuda",
        "--compile",
        "off",
        "--eval-every",
        1000,
        "--log-every",
        1,
        "--seed",
        0,
        *TINY,
    ]
    p = _torchrun(["train", "--out", out, "--max-steps", 100000, *common])
    try:
        wait_for_step(out, 20, p, timeout=300)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    from gradlm.rundir import RunDir

    step = RunDir(out).load_state()["step"]
    assert step >= 20, err[-3000:]
    q = _torchrun(["train", "--out", out, "--resume", "--max-steps", step + 5, "--no-progress"])
    _, err = q.communicate(timeout=600)
    assert q.returncode == 0, err[-3000:]
    assert summary(out)["steps"] == step + 5
