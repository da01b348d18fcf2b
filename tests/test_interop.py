"""Export to / import from Hugging Face, checked by transformers itself: same logits, same token ids,
same greedy text, in both directions; and every unsupported checkpoint refused with one clear line."""

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from gradlm.cli import main  # noqa: E402
from gradlm.text.data import TokenData  # noqa: E402
from gradlm.generation.engine import Engine, Request  # noqa: E402
from gradlm.generation.generate import SamplingConfig  # noqa: E402
from gradlm.formats.hf import EXPORT_FILES, export_hf, import_hf  # noqa: E402
from gradlm.model.transformer import ModelConfig  # noqa: E402
from gradlm.text.tokenizer import Tokenizer  # noqa: E402
from gradlm.rundir import load_model  # noqa: E402
from gradlm.training.config import TrainConfig  # noqa: E402
from gradlm.training.trainer import train  # noqa: E402

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice


TEXTS = [
    "Helo wrold!! Thsi is teh qeustion, isnt it?",
    "emoji 🙂👍🏽 and flags 🇫🇷, café naïve Zürich 東京",
    "ROMEO:\n\n\tWhat light   through yonder\r\nwindow breaks?  \n",
    "numbers 1234567 and don't WON'T y'all'd've",
    "spaces before punctuation , like this . and do n't 're ?",  # what "clean up tokenization spaces" would eat
]
VARIANTS = {
    "llama": {},
    "qwen3": {"qk_norm": True, "n_kv_head": 2, "tie_embeddings": True},  # QK-norm, GQA, tied head
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These matrices are tiny: threads only add overhead, and on a busy shared CPU OpenMP's spin-waiting
    made two-thread training up to 20x slower. One thread keeps this file fast everywhere."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def quick_train(model_cfg: ModelConfig, data: Path, out: Path, **kw) -> dict:
    cfg = dict(
        data=str(data),
        out=str(out),
        batch="16",
        max_steps=200,
        lr=1e-2,
        warmup_steps=10,
        vocab_size=300,
        eval_every=1000,
        eval_tokens=1024,
        seed=0,
        progress=False,
        plots=False,
        dtype="float32",
    )
    cfg.update(kw)
    with pytest.MonkeyPatch.context() as mp:  # module-scoped fixtures cannot use the autouse cache fixture
        mp.setenv("GRADLM_CACHE", str(out.parent / "cache"))
        return train(model_cfg, TrainConfig(**cfg))


def hf_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def max_logit_diff(ours, theirs, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        return (ours(x) - theirs(x).logits).abs().max().item()


def run_cli(args, capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what came before (transformers' progress bars)
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def no_temp_dirs(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".")]


# ---- export ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory, text_file):
    """A briefly trained tiny model (of each variant) and its export."""
    base = tmp_path_factory.mktemp(f"export-{request.param}")
    run = base / "run"
    quick_train(ModelConfig(n_layer=2, d_model=64, n_head=4, block_size=64, **VARIANTS[request.param]), text_file, run)
    export_hf(run, base / "hf")
    return request.param, run, base / "hf"


def test_export_config_and_files(exported):
    variant, run, hf = exported
    model, tok = load_model(run)
    assert sorted(p.name for p in hf.iterdir()) == sorted(EXPORT_FILES)
    c = json.loads((hf / "config.json").read_text())
    assert c["architectures"] == ["Qwen3ForCausalLM" if variant == "qwen3" else "LlamaForCausalLM"]
    assert (
        c["head_dim"] == 16 and c["max_position_embeddings"] == 64 and c["num_key_value_heads"] == model.cfg.n_kv_head
    )
    assert c["rope_theta"] == model.cfg.rope_theta and c["rms_norm_eps"] == model.cfg.norm_eps
    assert c["tie_word_embeddings"] == (variant == "qwen3")
    assert (
        c["eos_token_id"] == c["bos_token_id"] == tok.specials["<|endoftext|>"]
        and c["pad_token_id"] == tok.specials["<|pad|>"]
    )
    tc = json.loads((hf / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and tc["eos_token"] == "<|endoftext|>"
    # transformers 5 ignores these for BPE tokenizers, 4.x does not: without them it adds BOS / eats spaces.
    assert tc["add_bos_token"] is False and tc["clean_up_tokenization_spaces"] is False
    keys = set(load_file(hf / "model.safetensors"))
    assert ("lm_head.weight" in keys) == (variant == "llama") and "model.embed_tokens.weight" in keys
    hm = hf_model(hf)
    assert type(hm).__name__ == c["architectures"][0]
    assert hm.config.tie_word_embeddings == (variant == "qwen3")
    if variant == "qwen3":
        assert hm.lm_head.weight.data_ptr() == hm.model.embed_tokens.weight.data_ptr()
    assert hm.generation_config.eos_token_id == tok.eot_id


def test_export_logits_match_transformers(exported):
    _, run, hf = exported
    model, tok = load_model(run)
    hm = hf_model(hf)
    ids = tok.encode(" ".join(TEXTS))[: model.cfg.block_size]
    assert len(ids) == model.cfg.block_size
    diff = max_logit_diff(model, hm, ids)
    print(f"export max logit diff: {diff:.3g}")
    assert diff < 1e-4


def test_export_tokenizer_matches_transformers(exported):
    _, run, hf = exported
    _, tok = load_model(run)
    ht = AutoTokenizer.from_pretrained(hf)
    assert ht.eos_token == "<|endoftext|>" and ht.eos_token_id == tok.eot_id and ht.pad_token == "<|pad|>"
    for text in TEXTS:
        ids = tok.encode(text)
        assert ht(text)["input_ids"] == ids  # no BOS/EOS added behind our back
        assert ht.decode(ids) == tok.decode(ids) == text
    chat = "<|user|>hi 🙂<|end|><|assistant|>"
    assert ht(chat)["input_ids"] == tok.encode(chat, allow_special=True)
    assert ht.decode(tok.encode(chat, allow_special=True)) == chat


# Two correct implementations of one model differ by < 1e-4 in a logit (test_export_logits_match_transformers);
# a greedy choice whose lead is under ten times that may go either way, and the two paths part there.
NEAR_TIE = 1e-3


def test_export_greedy_generation_matches_transformers(exported):
    """gradlm's engine (the prompts in one batch) and transformers' generate (one by one), each through its own
    KV cache, make the same greedy choices from the same distributions on the exported model.

    Nothing here depends on what the short run learned, which differs by CPU (their kernels round differently;
    on one Intel box this model repeats one token): every step's distribution is compared, not only its argmax,
    so a cache that drifts fails even where the greedy token would not move, and the check is as strict on a
    repetitive continuation as on a varied one; five different prompts give five different contexts. Tokens
    must be equal at every step until a near-tie, where either of the tied tokens is right and the paths part."""
    _, run, hf = exported
    model, tok = load_model(run)
    hm = hf_model(hf)
    prompts = [tok.encode(text)[:24] for text in TEXTS]
    cfg = SamplingConfig(temperature=0, max_new_tokens=32)
    runs = Engine(model, tok, max_batch=len(prompts)).run(
        [Request(p, cfg, 1, frozenset({tok.eot_id}), logprobs=5) for p in prompts]
    )
    compared = 0
    for prompt, pieces in zip(prompts, runs):
        x = torch.tensor([prompt])
        out = hm.generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=32,
            output_logits=True,
            return_dict_in_generate=True,
        )
        theirs = out.sequences[0, len(prompt) :].tolist()
        ours = [piece.token for piece in pieces]
        for step, (token, logits) in enumerate(zip(ours, out.logits)):
            lp = torch.log_softmax(logits[0].float(), dim=-1)
            for i, ours_lp in ((token.id, token.logprob), *token.top):
                assert abs(lp[i].item() - ours_lp) < 2e-4, (prompt, step, i)  # log softmax: twice a logit's error
            compared += 1
            if token.id != theirs[step]:
                lead = logits[0].float()
                assert lead.max() - lead[token.id] < NEAR_TIE, (prompt, step, token.id, theirs[step])
                break
        else:
            assert [t.id for t in ours] == theirs  # no near-tie: the whole continuation, and where it stopped
    assert compared >= 32  # a near-tie at every prompt's first step would leave nothing compared


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_export_half_precision(exported, dtype, tmp_path, capsys):
    _, run, full = exported
    out = tmp_path / "hf"
    rc, stdout, _ = run_cli(["export", run, out, "--dtype", dtype], capsys)
    assert rc == 0 and len(stdout.strip().splitlines()) == 1
    half = load_file(out / "model.safetensors")
    assert {t.dtype for t in half.values()} == {getattr(torch, dtype)}
    assert half.keys() == load_file(full / "model.safetensors").keys()  # a tied head is still stored once
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    # transformers upcasts the stored half weights exactly; ours rounded the same way must agree.
    model, tok = load_model(run)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(getattr(torch, dtype)).float())
    assert max_logit_diff(model, hf_model(out), tok.encode(TEXTS[0])) < 1e-4


def test_export_refuses_a_foreign_directory_and_replaces_a_previous_export(exported, tmp_path, capsys):
    _, run, _ = exported
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    rc, _, err = run_cli(["export", run, foreign], capsys)
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1 and "not empty" in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and no_temp_dirs(tmp_path)
    # A folder that merely looks like an export (config.json not written by gradlm) is foreign too.
    (foreign / "notes.txt").unlink()
    (foreign / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    assert run_cli(["export", run, foreign], capsys)[0] == 2
    assert (foreign / "config.json").read_text() == '{"architectures": ["LlamaForCausalLM"]}'
    # A previous export is replaced whole.
    out = tmp_path / "hf"
    assert run_cli(["export", run, out], capsys)[0] == 0
    assert run_cli(["export", run, out, "--dtype", "bfloat16"], capsys)[0] == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16" and no_temp_dirs(tmp_path)
    # An empty directory is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(["export", run, empty], capsys)[0] == 0 and (empty / "model.safetensors").is_file()


def test_export_then_import_round_trips_exactly(exported, tmp_path, capsys):
    _, run, hf = exported
    rc, stdout, _ = run_cli(["import", hf, tmp_path / "back"], capsys)
    assert rc == 0 and len(stdout.strip().splitlines()) == 1
    a, ta = load_model(run)
    b, tb = load_model(tmp_path / "back")
    assert a.cfg == b.cfg and ta.sha256 == tb.sha256 and ta.backend == tb.backend == "tiktoken"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- import ------------------------------------------------------------------------------------------


def hf_config(kind: str, tok: Tokenizer, **kw):
    common = dict(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        rms_norm_eps=1e-6,
        bos_token_id=tok.eot_id,
        eos_token_id=tok.eot_id,
    )
    common.update(kw)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    return Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)


def save_hf(cfg, tok: Tokenizer, out: Path, seed: int = 0):
    """A transformers model from a config, every weight (norms included) random, saved with a tokenizer."""
    model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    model.eval().save_pretrained(out)
    PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer.from_str(tok.hf.to_str()), eos_token="<|endoftext|>"
    ).save_pretrained(out)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def hf_dir(request, tmp_path_factory, tok):
    out = tmp_path_factory.mktemp(f"hf-{request.param}") / "ckpt"
    save_hf(hf_config(request.param, tok), tok, out)
    return request.param, out


def test_import_matches_transformers(hf_dir, tmp_path, capsys):
    kind, src = hf_dir
    rc, stdout, _ = run_cli(["import", src, tmp_path / "run"], capsys)
    assert rc == 0 and len(stdout.strip().splitlines()) == 1
    model, tok = load_model(tmp_path / "run")
    cfg = model.cfg
    assert (cfg.qk_norm, cfg.tie_embeddings) == ((True, True) if kind == "qwen3" else (False, False))
    assert (cfg.n_head, cfg.n_kv_head, cfg.d_model, cfg.d_ff, cfg.block_size) == (4, 2, 64, 96, 128)
    assert cfg.rope_theta == 5000.0 and cfg.norm_eps == 1e-6 and tok.eos_token == "<|endoftext|>"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    # defaults, ready for --init
    assert saved["train"] == {**asdict(TrainConfig(out=str(tmp_path / "run"))), "batch": 32}
    ht = AutoTokenizer.from_pretrained(src)
    ids = tok.encode(" ".join(TEXTS))
    assert ids == ht(" ".join(TEXTS), add_special_tokens=False)["input_ids"]
    diff = max_logit_diff(model, hf_model(src), ids[:128])
    assert diff < 1e-4
    rc, stdout, _ = run_cli(
        ["generate", tmp_path / "run", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0"], capsys
    )
    assert rc == 0 and stdout.strip()


def test_imported_model_continues_training(hf_dir, tmp_path, text_file):
    _, src = hf_dir
    import_hf(src, tmp_path / "base")
    s = train(
        ModelConfig(),
        TrainConfig(
            init=str(tmp_path / "base"),
            data=str(text_file),
            out=str(tmp_path / "tuned"),
            batch="4",
            max_steps=3,
            warmup_steps=0,
            lr=1e-3,
            eval_every=1000,
            eval_tokens=512,
            progress=False,
            plots=False,
        ),
    )
    assert s["steps"] == 3 and math.isfinite(s["val_loss"])
    a, _ = load_model(tmp_path / "base")
    b, _ = load_model(tmp_path / "tuned")
    assert a.cfg == b.cfg
    assert not torch.equal(a.layers[0].mlp.up_proj.weight, b.layers[0].mlp.up_proj.weight)  # it did learn


@pytest.mark.parametrize("named_by", ["tokenizer_config.json", "config.json"])
def test_import_without_endoftext_keeps_the_checkpoints_eos(named_by, tok, tmp_path, text_file):
    """A tokenizer whose end-of-text token is "</s>": the run keeps it through load, training and export."""
    spec = json.loads(tok.hf.to_str())
    for t in spec["added_tokens"]:
        if t["content"] == "<|endoftext|>":
            t["content"] = "</s>"
    eos_id = tok.eot_id
    src = tmp_path / "hf"
    save_hf(hf_config("llama", tok), tok, src)
    (src / "tokenizer.json").write_text(json.dumps(spec))
    if named_by == "tokenizer_config.json":
        (src / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>"})
        )
    else:
        (src / "tokenizer_config.json").unlink()
    import_hf(src, tmp_path / "run")
    loaded = Tokenizer.load(tmp_path / "run")
    assert loaded.eos_token == "</s>" and loaded.eot_id == eos_id
    assert loaded.sha256 != Tokenizer(HFTokenizer.from_str(json.dumps(spec))).sha256  # eos is part of its identity
    s = quick_train(ModelConfig(), text_file, tmp_path / "tuned", init=str(tmp_path / "run"), max_steps=2, batch="4")
    assert s["steps"] == 2
    _, tuned_tok = load_model(tmp_path / "tuned")
    assert tuned_tok.eos_token == "</s>"
    data = json.loads((tmp_path / "tuned" / "config.json").read_text())["data"]["path"]
    assert int(TokenData(data).tokens("train")[0]) == eos_id  # documents are separated by </s>
    export_hf(tmp_path / "tuned", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == eos_id
    assert AutoTokenizer.from_pretrained(tmp_path / "out").eos_token == "</s>"


def test_import_qwen2_without_biases(tok, tmp_path):
    src = tmp_path / "hf"
    model = save_hf(hf_config("qwen2", tok), tok, src)
    state = load_file(src / "model.safetensors")
    assert any(k.endswith(".bias") for k in state)  # transformers' Qwen2 always has q/k/v biases...
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
    save_file({k: v for k, v in state.items() if not k.endswith(".bias")}, src / "model.safetensors", {"format": "pt"})
    import_hf(src, tmp_path / "run")  # ...and one saved without them is a Llama with Qwen2's name
    ours, t = load_model(tmp_path / "run")
    assert not ours.cfg.qk_norm and max_logit_diff(ours, model, t.encode(TEXTS[1])) < 1e-4


def _edit_config(**changes):
    def edit(d: Path, tok: Tokenizer):
        c = json.loads((d / "config.json").read_text())
        c.update(changes)
        (d / "config.json").write_text(json.dumps(c))

    return edit


def _replace_weights_with(name: str):
    def edit(d: Path, tok: Tokenizer):
        (d / "model.safetensors").unlink()
        (d / name).write_bytes(b"never read")

    return edit


def _word_level_tokenizer(d: Path, tok: Tokenizer):
    from tokenizers import models

    HFTokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(d / "tokenizer.json"))


def _qwen2_with_biases(d: Path, tok: Tokenizer):
    shutil.rmtree(d)
    save_hf(hf_config("qwen2", tok), tok, d)


BAD_CHECKPOINTS = {
    "architecture": (_edit_config(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "unsupported architecture"),
    "missing weights": (lambda d, tok: (d / "model.safetensors").unlink(), "no model.safetensors"),
    "pickle": (_replace_weights_with("pytorch_model.bin"), "pickled"),
    "sharded": (_replace_weights_with("model.safetensors.index.json"), "sharded"),
    "rope scaling": (
        _edit_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0}),
        "rope",
    ),
    "attention bias": (_edit_config(attention_bias=True), "biases"),
    "head_dim": (_edit_config(head_dim=32), "head_dim"),
    "remote code": (_edit_config(auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"}), "auto_map"),
    "tokenizer": (_word_level_tokenizer, "byte-level BPE"),
    "no tokenizer": (lambda d, tok: (d / "tokenizer.json").unlink(), "no tokenizer.json"),
    "qwen2 biases": (_qwen2_with_biases, "bias"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_import_refuses_unsupported_checkpoints(case, tok, tmp_path, capsys):
    src = tmp_path / "hf"
    save_hf(hf_config("llama", tok), tok, src)
    edit, message = BAD_CHECKPOINTS[case]
    edit(src, tok)
    out = tmp_path / "runs" / "imported"
    rc, _, err = run_cli(["import", src, out], capsys)
    assert rc == 2, err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and message in err, err
    if case not in ("missing weights", "no tokenizer", "pickle", "sharded"):
        assert "gradlm imports LlamaForCausalLM" in err or "byte-level" in err  # says what is supported
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))


def test_import_refuses_an_existing_run(hf_dir, tmp_path, capsys):
    _, src = hf_dir
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    rc, _, err = run_cli(["import", src, tmp_path / "run"], capsys)
    assert rc == 2 and "not empty" in err and [p.name for p in (tmp_path / "run").iterdir()] == ["config.json"]
