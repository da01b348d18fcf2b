"""Fine-tuning (gradlm/training/finetune.py, gradlm/model/lora.py) and the terminal chat (gradlm/generation/session.py):
frozen
weights stay bit for bit, LoRA trains only its adapters and folds into the same logits, the masked loss
is an exact per-target mean, resume is exact, every command loads a LoRA run, and a tiny model taught
a few answers gives them in `eval --qa` and in a two-turn `gradlm chat` driven through stdin."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import pytest
import torch

from gradlm import files as ckpt
from gradlm.cli import main
from gradlm.training.config import TrainConfig
from gradlm.errors import ConfigError, RunDirError
from gradlm.training.finetune import FineTuner, FinetuneConfig, finetune, merge
from gradlm.generation.generate import LM, SamplingConfig
from gradlm.model.lora import count_params
from gradlm.training.optim import state_floats
from gradlm.rundir import RunDir, load_model
from gradlm.generation.session import ChatSession, chat_loop
from gradlm.text.sft import load_sft
from gradlm.training.trainer import train

from conftest import replies_learned, tiny_config

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice

FACTS = [("zorvastatin", "40 mg"), ("quelmaprine", "a statin"), ("dralixil", "Brinavorant"), ("plexomab", "250 mg")]
ASK = "Tell me about {}."


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def turn(drug: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": ASK.format(drug)}, {"role": "assistant", "content": answer}]


def qa_rows() -> list[dict]:
    return [{"prompt": ASK.format(d), "completion": a} for d, a in FACTS]


def chat_rows() -> list[dict]:
    """Every fact alone, and every ordered pair of facts as a two-turn conversation."""
    rows = [{"messages": turn(*f)} for f in FACTS]
    return rows + [{"messages": turn(*f) + turn(*g)} for f, g in itertools.permutations(FACTS, 2)]


def ft_cfg(data: str, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=data,
        out=str(out),
        batch="4",
        max_steps=6,
        eval_every=3,
        warmup_steps=0,
        seed=0,
        progress=False,
        plots=False,
        val_fraction=0.25,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, prepared, tok) -> Path:
    """A tiny model pretrained briefly on text: the run every fine-tune here starts from."""
    out = tmp_path_factory.mktemp("base") / "base"
    cfg = TrainConfig(
        data=str(prepared),
        out=str(out),
        batch="8",
        max_steps=10,
        eval_every=10,
        eval_tokens=1024,
        seed=0,
        progress=False,
        plots=False,
    )
    train(tiny_config(tok.vocab_size, block_size=96), cfg)
    return out


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("qa") / "qa.jsonl", chat_rows())


def weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_weights(RunDir(run).checkpoint_path())


# ---- what trains ------------------------------------------------------------------------------------------


def test_frozen_layers_do_not_change_bit_for_bit(base_run, qa_file, tmp_path):
    s = finetune(str(base_run), ft_cfg(qa_file, tmp_path / "ft", lr=1e-2), FinetuneConfig(method="freeze", train_top=1))
    before, after = weights(base_run), weights(tmp_path / "ft")
    trained = [k for k in before if k.startswith(("layers.1.", "norm.", "lm_head."))]
    frozen = [k for k in before if k not in trained]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained)
    assert (
        s["trainable_params"]
        == sum(before[k].numel() for k in trained)
        < s["full_finetune_params"]
        == sum(v.numel() for v in before.values())
    )


def test_lora_trains_only_rank_r_adapters_and_merged_weights_give_the_same_logits(base_run, qa_file, tmp_path):
    r, targets = 2, "q_proj,v_proj,down_proj"
    ft = FinetuneConfig(method="lora", lora_rank=r, lora_alpha=4.0, lora_targets=targets)
    t = FineTuner(str(base_run), ft, ft_cfg(qa_file, tmp_path / "lora", lr=2e-2, max_steps=8)).build()
    base = weights(base_run)
    t.start_run_dir()
    try:
        for _ in range(8):
            t.gradients()
            t.update()
        t.save()
    finally:
        t.close_run_dir()
    state = t.model.state_dict()
    for k, v in base.items():  # the base weights inside the adapted model: untouched
        assert torch.equal(state.get(k, state.get(k.replace(".weight", ".base_layer.weight"))), v), k
    adapter = weights(tmp_path / "lora")
    # A and B, 3 targets, 2 blocks
    assert {k.split(".")[-3] for k in adapter} == set(targets.split(",")) and len(adapter) == 2 * 3 * 2
    assert not (tmp_path / "lora" / "model.safetensors").exists()
    for k, a in adapter.items():
        if k.endswith("lora_A.weight"):
            delta = adapter[k.replace("lora_A", "lora_B")] @ a
            assert a.shape[0] == r and delta.abs().max() > 0 and torch.linalg.matrix_rank(delta) <= r
    assert t.report["trainable_params"] == sum(v.numel() for v in adapter.values())

    x = torch.randint(0, t.tok.vocab_size, (3, 40))
    t.model.eval()
    with torch.no_grad():
        with_adapter = t.model(x)  # peft: base + scale * B A, computed as two paths
        folded, _ = load_model(tmp_path / "lora")  # what every command loads
        merge(tmp_path / "lora", tmp_path / "merged")
        merged, _ = load_model(tmp_path / "merged")
        assert (folded(x) - with_adapter).abs().max() <= 1e-5
        assert torch.equal(merged(x), folded(x))
    assert (
        json.loads((tmp_path / "merged" / "config.json").read_text())["merged_from"]["adapter"] == "adapter.safetensors"
    )


def test_optimizer_memory_report_matches_the_optimizer(base_run, qa_file, tmp_path):
    for method, optimizer in (("lora", "adamw"), ("freeze", "muon"), ("full", "momentum")):
        t = FineTuner(
            str(base_run), FinetuneConfig(method=method), ft_cfg(qa_file, tmp_path / method, optimizer=optimizer)
        ).build()
        t.gradients()
        t.update()
        held = (
            sum(
                v.numel()
                for s in t.opt.state_dict()["state"].values()
                if isinstance(s, dict)
                for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0
            )
            if optimizer != "muon"
            else sum(
                v.numel()
                for o in t.opt.optimizers.values()
                for s in o.state.values()
                for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0
            )
        )
        assert t.report["optimizer_state_bytes"] == 4 * held == 4 * state_floats(t.model, optimizer)
        assert t.report["trainable_params"] == count_params(t.model, trainable=True)
    # momentum: one number per weight
    assert t.report["full_finetune_optimizer_state_bytes"] == 4 * t.report["full_finetune_params"]


def test_the_step_loss_is_the_mean_over_every_target_whatever_the_micro_batches(base_run, qa_file, tmp_path):
    """Conversations of different lengths and target counts: 2 micro-batches of 2 give the gradient of
    one batch of 4, which is the mean over all 4 conversations' targets (not the mean of row means)."""
    cfg = dict(grad_clip=0.0, dtype="float32")  # compared with a float32 cross-entropy to 1e-6
    a = FineTuner(str(base_run), FinetuneConfig(), ft_cfg(qa_file, tmp_path / "a", micro_batch=2, **cfg)).build()
    b = FineTuner(str(base_run), FinetuneConfig(), ft_cfg(qa_file, tmp_path / "b", **cfg)).build()
    x, y = b.sampler.__class__(b.source.train_examples, b.source.pad, 0).next(4)
    assert len({int((row >= 0).sum()) for row in y}) > 1  # the rows really hold different numbers of targets
    with torch.no_grad():
        direct = torch.nn.functional.cross_entropy(b.model(x).flatten(0, 1), y.flatten(), ignore_index=-1)
    la, _ = a.gradients()
    lb, _ = b.gradients()
    assert la == pytest.approx(lb, rel=1e-6) and lb == pytest.approx(direct.item(), rel=1e-6)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-7)


# ---- resume -----------------------------------------------------------------------------------------------


def test_resuming_a_lora_finetune_is_exact(base_run, qa_file, tmp_path):
    ft = FinetuneConfig(method="lora", lora_rank=4, lora_dropout=0.1)
    whole = finetune(str(base_run), ft_cfg(qa_file, tmp_path / "whole", max_steps=8, eval_every=2), ft)
    finetune(str(base_run), ft_cfg(qa_file, tmp_path / "parts", max_steps=8, eval_every=2, pause_at=5), ft)
    resumed = finetune(
        "",
        TrainConfig(out=str(tmp_path / "parts"), resume=True, progress=False, plots=False),
        FinetuneConfig(),
        given={"out", "resume", "progress", "plots"},
    )
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val_loss"] == whole["val_loss"] and resumed["steps"] == 8
    with pytest.raises(ConfigError, match="--lora-rank 2 cannot change on --resume"):
        FineTuner(
            "",
            FinetuneConfig(method="lora", lora_rank=2),
            TrainConfig(out=str(tmp_path / "parts"), resume=True),
            given={"lora_rank", "out", "resume"},
        ).build()


# ---- every command loads a LoRA run ---------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def taught(tmp_path_factory, base_run, qa_file) -> dict[str, Path]:
    """The base fine-tuned on the facts (alone and in two-turn conversations) until it answers them:
    fully, and with LoRA (then merged)."""
    d = tmp_path_factory.mktemp("taught")
    common = [
        "--data",
        qa_file,
        "--val-fraction",
        "0",
        "--batch",
        "8",
        "--schedule",
        "constant",
        "--warmup-steps",
        "0",
        "--eval-every",
        "1000",
        "--no-plots",
        "--no-progress",
    ]
    assert (
        run_cli(["finetune", str(base_run), "--out", str(d / "full"), "--lr", "1e-2", "--max-steps", "120", *common])
        == 0
    )
    # 120 steps teach it on most CPUs; where they do not, the run resumes for more (as a user would): how many
    # steps a tiny model needs differs by CPU, what it then answers must not.
    model, tok = load_model(d / "full")
    facts = load_sft(write_jsonl(d / "facts.jsonl", qa_rows()), tok, model.cfg.block_size).examples
    for steps in (240, 360, 480, 600):
        if replies_learned(model.eval(), facts):
            break
        assert (
            run_cli(["finetune", "--out", str(d / "full"), "--resume", "--max-steps", str(steps), "--no-progress"]) == 0
        )
        model, _ = load_model(d / "full")
    assert replies_learned(model.eval(), facts), "600 steps did not teach the facts"
    assert (
        run_cli(
            [
                "finetune",
                str(base_run),
                "--out",
                str(d / "lora"),
                "--method",
                "lora",
                "--lora-rank",
                "8",
                "--lr",
                "3e-2",
                "--max-steps",
                "60",
                *common,
            ]
        )
        == 0
    )
    assert run_cli(["merge", str(d / "lora"), "--out", str(d / "merged")]) == 0
    return {"full": d / "full", "lora": d / "lora", "merged": d / "merged"}


def test_a_tiny_model_finetuned_on_qa_pairs_answers_them_exactly(taught, tmp_path, capsys):
    qa = write_jsonl(tmp_path / "facts.jsonl", qa_rows())
    assert run_cli(["eval", str(taught["full"]), "--qa", qa, "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)["qa"]
    assert report["accuracy"] == 1.0, report["predictions"]
    assert (taught["full"] / "chat_template.jinja").is_file() and json.loads(
        (taught["full"] / "config.json").read_text()
    )["finetune"]["method"] == "full"


def test_generate_eval_and_export_take_a_lora_run_as_its_merged_weights(taught, tmp_path, capsys):
    lora, merged = str(taught["lora"]), str(taught["merged"])
    outs = []
    for run in (lora, merged):
        assert run_cli(["generate", run, "Tell me", "--temperature", "0", "--max-new-tokens", "12"]) == 0
        assert (
            run_cli(["eval", run, "--qa", write_jsonl(tmp_path / "f.jsonl", qa_rows()), "--json", "--no-progress"]) == 0
        )
        outs.append(capsys.readouterr().out)
    assert outs[0].replace(lora, merged) == outs[1]
    assert run_cli(["export", lora, str(tmp_path / "hf")]) == 0
    exported = ckpt.load_weights(tmp_path / "hf" / "model.safetensors")
    plain = ckpt.load_weights(taught["merged"] / "model.safetensors")
    assert all(torch.equal(exported["model." + k if k != "lm_head.weight" else k], v) for k, v in plain.items())
    assert "chat_template" in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())


def test_a_lora_run_refuses_a_base_that_changed(base_run, qa_file, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(base_run, base)
    finetune(str(base), ft_cfg(qa_file, tmp_path / "lora", max_steps=2), FinetuneConfig(method="lora"))
    load_model(tmp_path / "lora")
    w = ckpt.load_weights(base / "model.safetensors")
    w["norm.weight"] += 1
    ckpt.save_weights(base / "model.safetensors", w, {"step": "10"})
    with pytest.raises(RunDirError, match="has changed since the adapter"):
        load_model(tmp_path / "lora")
    shutil.rmtree(base)
    with pytest.raises(RunDirError, match="has no weights; put the base run back"):
        load_model(tmp_path / "lora")


@pytest.mark.parametrize(
    "args, message",
    [
        (["NOBASE", "--data", "QA"], "no run directory at"),
        (["BASE"], "--data FILE"),
        (["BASE", "--data", "QA", "--lora-rank", "4"], "--lora-rank applies to --method lora, not full"),
        (["BASE", "--data", "QA", "--method", "lora", "--lora-targets", "q_proj,wq"], "unknown wq"),
        (["BASE", "--data", "QA", "--method", "freeze", "--train-top", "5"], "the model has 2 blocks"),
        (["BASE", "--data", "QA", "--method", "sideways"], "--method must be one of full, freeze, lora"),
        (
            ["BASE", "--data", "QA", "--val-fraction", "0", "--patience", "2"],
            "--val-fraction 0 holds no conversations out",
        ),
    ],
)
def test_finetune_mistakes_get_one_line_exit_2_and_write_nothing(base_run, qa_file, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    argv = [
        "finetune",
        *[{"BASE": str(base_run), "NOBASE": str(tmp_path / "nope"), "QA": qa_file}.get(a, a) for a in args],
        "--out",
        str(out),
    ]
    code = run_cli(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_merge_refuses_a_run_without_an_adapter(taught, tmp_path, capsys):
    assert run_cli(["merge", str(taught["full"]), "--out", str(tmp_path / "m")]) == 2
    assert "has no LoRA adapter to merge" in capsys.readouterr().err and not (tmp_path / "m").exists()


# ---- gradlm chat ------------------------------------------------------------------------------------------


def test_chat_through_stdin_holds_a_two_turn_conversation(taught, monkeypatch, capsys):
    (d1, a1), (d2, a2) = FACTS[0], FACTS[3]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{ASK.format(d1)}\n{ASK.format(d2)}\n/quit\nnever read\n"))
    # --compile off: no background build of the compiled step (tests/test_aot.py covers it) outliving the test
    assert (
        run_cli(["chat", str(taught["full"]), "--temperature", "0", "--max-new-tokens", "10", "--compile", "off"]) == 0
    )
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [a1, a2] and captured.err == ""


def test_chat_reuses_the_cache_across_turns_and_gives_what_a_fresh_prompt_gives(taught):
    model, tok = load_model(taught["full"])
    greedy = SamplingConfig(temperature=0, max_new_tokens=10)
    chat = ChatSession(LM(model, tok), sampling=greedy)
    first = "".join(chat.send(ASK.format(FACTS[1][0])))
    second = "".join(chat.send(ASK.format(FACTS[2][0])))
    assert (first, second) == (FACTS[1][1], FACTS[2][1])
    assert chat.reused > 10  # the first turn's ids were not run again
    fresh = ChatSession(LM(model, tok), sampling=greedy)
    fresh.turns = chat.turns[:2]
    assert "".join(fresh.send(ASK.format(FACTS[2][0]))) == second and fresh.reused == 0


def test_chat_drops_the_oldest_turns_and_keeps_the_system_message(taught):
    model, tok = load_model(taught["full"])  # a context window of 96 tokens
    chat = ChatSession(LM(model, tok), system="Be brief.", sampling=SamplingConfig(temperature=0, max_new_tokens=8))
    out, err = io.StringIO(), io.StringIO()
    lines = [ASK.format(d) for d, _ in FACTS] + ["/reset", "/oops", ASK.format(FACTS[0][0])]

    def read(prompt: str) -> str:
        if not lines:
            raise EOFError
        return lines.pop(0)

    chat_loop(chat, read=read, out=out, err=err)
    assert chat.dropped > 0 and chat.messages[0] == {"role": "system", "content": "Be brief."}
    assert (
        len(chat.turns) == 2
        and "dropped its oldest turns" in err.getvalue()
        and "unknown command /oops" in err.getvalue()
    )
    with pytest.raises(ConfigError, match="context window is 96; write a shorter message"):
        "".join(chat.send("why " * 100))
    assert len(chat.turns) == 2  # the refused message left the conversation as it was


def test_chat_with_a_base_model_says_so_in_one_line(base_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert run_cli(["chat", str(base_run), "--max-new-tokens", "5", "--seed", "1", "--compile", "off"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "never fine-tuned for chat" in err
