"""Every user mistake: one `error:` line naming what was wrong, exit code 2, no traceback, and nothing
written or changed on disk (the workspace's tree, sizes and modification times are the same after).

The cases run in-process through gradlm.cli.main (and the Python API), in one shared workspace that holds a
tiny trained run, bad data files, bad config files and broken Hugging Face folders."""

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

from gradlm.cli import main
from gradlm.errors import GradlmError

TINY = [
    "--block-size",
    "32",
    "--n-layer",
    "2",
    "--n-head",
    "4",
    "--d-model",
    "32",
    "--batch",
    "8",
    "--eval-tokens",
    "1024",
    "--no-progress",
    "--no-plots",
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, small_text):
    """The workspace: every file a case may point at."""
    d = tmp_path_factory.mktemp("ws")
    (d / "ok.txt").write_text(small_text[:20000])
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with gzip.open(d / "bad.txt.gz", "wb") as f:
        f.write(b"\xff\xfe\x00")
    (d / "afile").write_text("a file, not a folder")
    (d / "emptyrun").mkdir()
    (d / "somedir").mkdir()
    (d / "notempty").mkdir()
    (d / "notempty" / "keep.txt").write_text("mine")
    (d / "bad.toml").write_text("optimizer = \n")
    (d / "unknown.toml").write_text('[train]\noptimiser = "adamw"\n')
    (d / "types.toml").write_text('[model]\nn-layer = "four"\n')
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "qa.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (d / "prompts.txt").write_text("")
    cache = d.parent / (d.name + "-cache")
    old = os.environ.get("GRADLM_CACHE")
    os.environ["GRADLM_CACHE"] = str(cache)
    try:
        assert (
            main(
                [
                    "train",
                    "--data",
                    str(d / "ok.txt"),
                    "--out",
                    str(d / "run"),
                    "--vocab-size",
                    "300",
                    "--max-steps",
                    "3",
                    "--eval-every",
                    "3",
                    *TINY,
                ]
            )
            == 0
        )
    finally:
        os.environ.pop("GRADLM_CACHE") if old is None else os.environ.__setitem__("GRADLM_CACHE", old)
    shutil.copytree(d / "run", d / "futurerun")
    cfg = json.loads((d / "futurerun" / "config.json").read_text())
    (d / "futurerun" / "config.json").write_text(json.dumps(dict(cfg, gradlm_version="9.0.0")))
    for name in ("hf_noconfig", "hf_badjson", "hf_remote", "hf_bin", "hf_notok"):
        (d / name).mkdir()
    (d / "hf_badjson" / "config.json").write_text("{not json")
    (d / "hf_remote" / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "auto_map": {"AutoModel": "x.Y"}})
    )
    llama = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 306,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
    }
    (d / "hf_bin" / "config.json").write_text(json.dumps(llama))
    (d / "hf_bin" / "pytorch_model.bin").write_bytes(b"pickle")
    shutil.copy(d / "run" / "tokenizer.json", d / "hf_bin" / "tokenizer.json")
    (d / "hf_notok" / "config.json").write_text(json.dumps(llama))
    shutil.copy(d / "run" / "model.safetensors", d / "hf_notok" / "model.safetensors")
    return d


def tree(root: Path) -> list[tuple[str, int, int]]:
    """Every file and folder with its size and modification time; a run's .lock (which a resume takes,
    with the holder's pid in it, before it reads the run) is the process's, not output."""
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.name != ".lock"
    )


CASES = {
    # output paths: checked before any work
    "train --out under a file": (
        ["train", "--data", "ok.txt", "--out", "afile/run"],
        "afile is a file, not a directory",
    ),
    "train --out is a file": (["train", "--data", "ok.txt", "--out", "afile"], "--out afile is a file"),
    "tokenizer --out under a file": (
        ["tokenizer", "train", "--data", "ok.txt", "--out", "afile/tok.json"],
        "afile is a file",
    ),
    "tokenizer --out missing": (["tokenizer", "train", "--data", "ok.txt"], "--out"),
    "prepare --out is a file": (["prepare", "--data", "ok.txt", "--out", "afile"], "--out afile is a file"),
    "lr-find --png under a file": (
        ["lr-find", "--data", "ok.txt", "--png", "afile/lr.png", "--steps", "10"],
        "afile is a file",
    ),
    "lr-find --png is a folder": (
        ["lr-find", "--data", "ok.txt", "--png", "somedir", "--steps", "10"],
        "is a directory",
    ),
    "compare --out is a file": (
        ["compare", "--data", "ok.txt", "--optimizer", "sgd", "--out", "afile", "--max-steps", "2"],
        "--out afile is a file",
    ),
    "plot --png under a file": (["plot", "run", "--png", "afile/x.png"], "afile is a file"),
    "export into a file": (["export", "run", "afile"], "afile is a file"),
    "export into a folder of mine": (["export", "run", "notempty"], "not a previous gradlm export"),
    "import into a file": (["import", "hf_bin", "afile"], "afile is a file"),
    # data and encodings
    "missing corpus": (["train", "--data", "missing.txt", "--out", "new"], "no such file"),
    "empty corpus": (["train", "--data", "empty.txt", "--out", "new"], "empty"),
    "binary corpus": (["train", "--data", "binary.txt", "--out", "new"], "binary"),
    "latin-1 corpus, strict": (
        ["train", "--data", "latin1.txt", "--out", "new", "--encoding-errors", "strict"],
        "latin1.txt is not valid UTF-8 (bad byte 0xe9 at offset 3)",
    ),
    "unknown encoding policy": (
        ["train", "--data", "latin1.txt", "--out", "new", "--encoding-errors", "ignore"],
        "--encoding-errors must be strict, replace or skip",
    ),
    "bad tokenizer sample": (
        ["tokenizer", "train", "--data", "ok.txt", "--out", "t.json", "--tokenizer-sample", "lots"],
        "--tokenizer-sample 'lots' is not a size",
    ),
    "corrupt gzip": (["train", "--data", "bad.txt.gz", "--out", "new"], "binary"),
    "tokenizer on empty text": (["tokenizer", "train", "--data", "empty.txt", "--out", "t.json"], "empty"),
    "prepare missing text": (["prepare", "--data", "missing.txt", "--out", "p"], "no such file"),
    "eval missing text": (["eval", "run", "--data", "missing.txt"], "no such file"),
    "empty prompts file": (["generate", "run", "--prompts", "prompts.txt"], "holds no prompts"),
    "QA line without an answer": (["eval", "run", "--qa", "qa.jsonl"], "qa.jsonl"),
    # sizes and flag values
    "vocab too small": (["train", "--data", "ok.txt", "--out", "new", "--vocab-size", "100"], "too small"),
    "window larger than the data": (
        ["train", "--data", "ok.txt", "--out", "new", "--block-size", "100000"],
        "context window",
    ),
    "width not divisible by heads": (["train", "--data", "ok.txt", "--out", "new", "--d-model", "30"], "divisible"),
    "batch 0": (["train", "--data", "ok.txt", "--out", "new", "--batch", "0"], "--batch"),
    "bad duration": (["train", "--data", "ok.txt", "--out", "new", "--max-time", "soon"], "--max-time"),
    "zero time budget": (
        ["train", "--data", "ok.txt", "--out", "new", "--max-time", "0"],
        "--max-time 0: a budget must be positive",
    ),
    "negative time budget": (
        ["train", "--data", "ok.txt", "--out", "new", "--max-time", "-1m"],
        "--max-time is a budget and must be a positive duration",
    ),
    "zero step budget": (
        ["train", "--data", "ok.txt", "--out", "new", "--max-steps", "0"],
        "--max-steps 0: a budget must be positive",
    ),
    "negative step budget": (
        ["train", "--data", "ok.txt", "--out", "new", "--max-steps", "-5"],
        "--max-steps is a budget and must be positive",
    ),
    "zero epochs in compare": (
        ["compare", "--data", "ok.txt", "--optimizer", "sgd", "--out", "cmp", "--max-epochs", "0"],
        "--max-epochs 0.0: a budget must be positive",
    ),
    "a flag's prefix": (
        ["train", "--data", "ok.txt", "--out", "new", "--optim", "sgd"],
        "unrecognized arguments: --optim",
    ),
    "compare's old plural flag": (
        ["compare", "--data", "ok.txt", "--optimizers", "sgd", "--out", "cmp", "--max-steps", "2"],
        "unrecognized arguments: --optimizers",
    ),
    "resume with a zero budget": (
        ["train", "--out", "run", "--resume", "--max-time", "0"],
        "--max-time 0: a budget must be positive",
    ),
    "lr not a number": (["train", "--data", "ok.txt", "--out", "new", "--lr", "fast"], "invalid float"),
    "unknown optimizer": (["train", "--data", "ok.txt", "--out", "new", "--optimizer", "adam"], "--optimizer"),
    "unknown size": (["train", "--data", "ok.txt", "--out", "new", "--size", "large"], "--size must be auto or fixed"),
    "resume with another size": (
        ["train", "--out", "run", "--resume", "--size", "fixed"],
        "--size fixed cannot change on --resume",
    ),
    "from-best without resume": (
        ["train", "--data", "ok.txt", "--out", "new", "--from-best"],
        "--from-best only applies with --resume",
    ),
    "negative temperature": (["generate", "run", "hi", "--temperature", "-1"], "temperature"),
    "prompt longer than the window": (["generate", "run", "word " * 400], "context window"),
    "generate batch 0": (["generate", "run", "hi", "--batch", "0"], "--batch"),
    "stride beyond the window": (["eval", "run", "--data", "ok.txt", "--stride", "100000"], "stride"),
    "a negative lr in compare": (
        ["compare", "--data", "ok.txt", "--lr", "0.001,-1", "--out", "cmp", "--max-steps", "2"],
        "--lr must be a positive number",
    ),
    "unknown subcommand": (["frobnicate"], "invalid choice"),
    "tokenize without a tokenizer": (["tokenize", "hi"], "--tokenizer"),
    # run directories
    "not a run": (["generate", "not-a-run", "hi"], "no run directory"),
    "a folder that is not a run": (["generate", "emptyrun", "hi"], "not a run directory"),
    "a run from a newer gradlm": (["generate", "futurerun", "hi"], "gradlm 9.0.0"),
    "train over an existing run": (["train", "--data", "ok.txt", "--out", "run"], "--resume"),
    "resume what is not a run": (["train", "--out", "notrun", "--resume"], "not a run directory"),
    "resume with another optimizer": (
        ["train", "--out", "run", "--resume", "--optimizer", "sgd"],
        "--optimizer sgd cannot change on --resume",
    ),
    "resume with another model shape": (
        ["train", "--out", "run", "--resume", "--n-layer", "5"],
        "--n-layer 5 cannot change",
    ),
    "resume a finished run": (["train", "--out", "run", "--resume"], "has finished its budget"),
    "resume with a spent budget": (
        ["train", "--out", "run", "--resume", "--max-steps", "1"],
        "--max-steps 1 is already spent",
    ),
    "export a run from a newer gradlm": (["export", "futurerun", "hf_out"], "gradlm 9.0.0"),
    # config files
    "config file not TOML": (["train", "--config", "bad.toml", "--out", "new"], "not valid TOML"),
    "config file with an unknown key": (
        ["train", "--config", "unknown.toml", "--out", "new"],
        "unknown setting optimiser",
    ),
    "config file with a wrong type": (
        ["train", "--config", "types.toml", "--data", "ok.txt", "--out", "new"],
        "ModelConfig.n_layer must be an integer",
    ),
    "config file missing": (["train", "--config", "missing.toml", "--out", "new"], "no such file"),
    "config file not a table": (["train", "--config", "list.yaml", "--out", "new"], "must hold a table"),
    # broken Hugging Face folders
    "import without config.json": (["import", "hf_noconfig", "new"], "no config.json"),
    "import a corrupt config.json": (["import", "hf_badjson", "new"], "not valid JSON"),
    "import remote code": (["import", "hf_remote", "new"], "custom code"),
    "import pickled weights": (["import", "hf_bin", "new"], "pickled weights"),
    "import without a tokenizer": (["import", "hf_notok", "new"], "no tokenizer.json"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_mistake(case, ws, monkeypatch, capsys):
    argv, message = CASES[case]
    monkeypatch.chdir(ws)
    before = tree(ws)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors (unknown flag, bad type) exit 2 from inside parse_args
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], err  # progress lines may come before it
    assert message in errors[0], err
    assert "Traceback" not in err
    assert tree(ws) == before  # nothing written, nothing changed


def _api_cases(ws):
    from gradlm import ModelConfig, SamplingConfig, TrainConfig, generate_text, load_model, train
    from gradlm.evaluation.evaluate import EvalConfig

    model, tok = load_model(ws / "run")
    return {
        "TrainConfig lr as text": (lambda: TrainConfig(lr="3e-3"), "TrainConfig.lr must be a number"),
        "TrainConfig batch as bool": (lambda: TrainConfig(batch=True), "TrainConfig.batch"),
        "ModelConfig width as text": (lambda: ModelConfig(d_model="128"), "ModelConfig.d_model must be an integer"),
        "SamplingConfig seed as float": (lambda: SamplingConfig(seed=1.5), "SamplingConfig.seed"),
        "EvalConfig stride as text": (lambda: EvalConfig(stride="x"), "EvalConfig.stride"),
        "train on a missing file": (
            lambda: train(ModelConfig(), TrainConfig(data=str(ws / "missing.txt"), out=str(ws / "new"))),
            "no such file",
        ),
        "load what is not a run": (lambda: load_model(ws / "emptyrun"), "not a run directory"),
        "prompt too long, API as CLI": (
            lambda: generate_text(model, tok, "word " * 400, SamplingConfig(max_new_tokens=2)),
            "context window",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "TrainConfig lr as text",
        "TrainConfig batch as bool",
        "ModelConfig width as text",
        "SamplingConfig seed as float",
        "EvalConfig stride as text",
        "train on a missing file",
        "load what is not a run",
        "prompt too long, API as CLI",
    ],
)
def test_api_mistake(case, ws):
    fn, message = _api_cases(ws)[case]
    before = tree(ws)
    with pytest.raises(GradlmError, match=message):
        fn()
    assert tree(ws) == before


def test_the_api_takes_natural_values(tmp_path):
    from gradlm import TrainConfig

    assert TrainConfig(batch=4).batch == "4" and TrainConfig(lr=1).lr == 1.0


def test_special_token_text_is_plain_everywhere_unless_allowed(ws, capsys):
    from gradlm import load_lm

    lm = load_lm(ws / "run")
    assert lm.tok.eot_id not in lm.encode_prompt("a <|endoftext|> b")
    assert lm.tok.eot_id in load_lm(ws / "run", allow_special=True).encode_prompt("a <|endoftext|> b")
    assert main(["tokenize", "<|endoftext|>", "--tokenizer", str(ws / "run"), "--ids"]) == 0
    plain = capsys.readouterr().out.split()
    assert str(lm.tok.eot_id) not in plain and len(plain) > 1
    assert main(["tokenize", "<|endoftext|>", "--tokenizer", str(ws / "run"), "--ids", "--allow-special"]) == 0
    assert capsys.readouterr().out.split() == [str(lm.tok.eot_id)]


def test_config_file_sets_flags_and_typed_flags_win(ws, tmp_path, capsys):
    cfg = tmp_path / "settings.toml"
    cfg.write_text('[train]\noptimizer = "muon"\nmax-steps = 7\n[model]\nn-layer = 3\n')
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(cfg), "--max-steps", "9", "--print-config"])
    assert e.value.code == 0
    import yaml

    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["optimizer"] == "muon" and shown["train"]["max_steps"] == 9 and shown["model"]["n_layer"] == 3
    yml = tmp_path / "settings.yaml"
    yml.write_text(yaml.safe_dump(shown))
    assert (
        main(
            [
                "train",
                "--config",
                str(yml),
                "--data",
                str(ws / "ok.txt"),
                "--out",
                str(tmp_path / "r"),
                "--vocab-size",
                "300",
                "--max-steps",
                "2",
                *TINY,
            ]
        )
        == 0
    )
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    # TINY's --n-layer 2 was typed: it wins
    assert saved["train"]["optimizer"] == "muon" and saved["model"]["n_layer"] == 2
    # a run's own config.json reproduces its settings
    with pytest.raises(SystemExit):
        main(["train", "--config", str(tmp_path / "r" / "config.json"), "--print-config"])
    assert yaml.safe_load(capsys.readouterr().out)["train"]["optimizer"] == "muon"


def test_every_command_that_writes_takes_an_output_location(ws, monkeypatch, capsys):
    monkeypatch.chdir(ws)
    before = tree(ws)
    tiny = [
        "--block-size",
        "32",
        "--n-layer",
        "2",
        "--n-head",
        "4",
        "--d-model",
        "32",
        "--batch",
        "8",
        "--vocab-size",
        "300",
        "--no-progress",
    ]
    # no --png: no file written
    assert main(["lr-find", "--data", "ok.txt", "--steps", "10", "--end-lr", "1", *tiny]) == 0
    assert "add --png FILE" in capsys.readouterr().out
    assert tree(ws) == before


def test_lr_find_offers_only_flags_that_mean_something_to_it(capsys):
    with pytest.raises(SystemExit):
        main(["lr-find", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--min-delta",
        "--guard-retries",
        "--patience",
        "--max-steps",
        "--eval-every",
        "--schedule",
        "--resume",
        "--sample-tokens",
        "--sample-prompt",
        "--snapshots",
    ):
        assert flag not in text, flag
    # --out: where the sweep is recorded
    for flag in ("--start-lr", "--optimizer", "--batch", "--png", "--config", "--out", "--watch"):
        assert flag in text, flag
