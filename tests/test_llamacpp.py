"""GGUF export, verified by llama.cpp itself (llama-cpp-python): the same token ids for any text, the same
greedy tokens in f32, nearly the same in f16 and q8_0, and the chat template rendering gradlm's ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlm.text.chat import encode_chat
from gradlm.training.config import TrainConfig
from gradlm.cli import main
from gradlm.formats.gguf import export_gguf, rope_to_interleaved
from gradlm.model.transformer import ModelConfig, apply_rope, rope_tables
from gradlm.rundir import load_model
from gradlm.training.trainer import train

from conftest import must_agree

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice

TEXTS = [
    "ROMEO: But soft, what light through yonder window breaks?",
    "acetaminophen 500 mg, mispeled wrds, ibuprofne and zorvastatinn",
    "emoji 🙂👍🏽 and 日本語, tabs\tand  spaces\n\nnew lines",
    "a typed <|endoftext|> and <|user|> are plain text",
    "   leading spaces, 1234567 numbers, don't we'll I'M",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_rope_reordering_keeps_every_attention_score():
    """q.k after the half-split rotation of the original rows equals q.k after the interleaved rotation of
    the reordered rows, at every pair of positions: llama.cpp's "llama" attention sees the same scores."""
    torch.manual_seed(0)
    heads, head_dim, d = 3, 8, 24
    wq, wk = torch.randn(heads * head_dim, d), torch.randn(heads * head_dim, d)
    x = torch.randn(5, d)  # 5 positions
    cos, sin = rope_tables(head_dim, 5, 10000.0)

    def half_split(w):  # gradlm / Hugging Face
        v = (x @ w.T).view(5, heads, head_dim).transpose(0, 1)  # (H, T, D)
        return apply_rope(v[None], cos[None, None], sin[None, None])[0]

    def interleaved(w):  # llama.cpp's LLAMA rope: pairs (2i, 2i+1), angle of pair i
        v = (x @ w.T).view(5, heads, head_dim // 2, 2).transpose(0, 1)  # (H, T, D/2, 2)
        c, s = cos[:, : head_dim // 2], sin[:, : head_dim // 2]
        a, b = v[..., 0], v[..., 1]
        return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)

    ours = half_split(wq) @ half_split(wk).transpose(-1, -2)
    theirs = interleaved(rope_to_interleaved(wq, heads)) @ interleaved(rope_to_interleaved(wk, heads)).transpose(-1, -2)
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert not torch.allclose(ours, interleaved(wq) @ interleaved(wk).transpose(-1, -2), atol=1e-2)  # without it: wrong


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_text) -> Path:
    d = tmp_path_factory.mktemp("gguf")
    (d / "text.txt").write_text(small_text[:40_000])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADLM_CACHE", str(d / "cache"))
        cfg = TrainConfig(
            data=str(d / "text.txt"),
            out=str(d / "run"),
            batch="16",
            max_steps=150,
            lr=1e-2,
            warmup_steps=10,
            vocab_size=400,
            eval_every=1000,
            eval_tokens=1024,
            seed=0,
            progress=False,
            plots=False,
            dtype="float32",
        )
        train(ModelConfig(n_layer=2, d_model=64, n_head=4, n_kv_head=2, block_size=64), cfg)
    return d / "run"


@pytest.fixture(scope="module")
def qk_run(run, tmp_path_factory) -> Path:
    """A Qwen3-shaped model (--qk-norm): exported as llama.cpp's "qwen3" architecture."""
    d = tmp_path_factory.mktemp("gguf-qk")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADLM_CACHE", str(d / "cache"))
        cfg = TrainConfig(
            data=str(run.parent / "text.txt"),
            out=str(d / "run"),
            batch="16",
            max_steps=60,
            lr=1e-2,
            warmup_steps=10,
            vocab_size=400,
            eval_every=1000,
            eval_tokens=1024,
            seed=0,
            progress=False,
            plots=False,
            dtype="float32",
        )
        train(
            ModelConfig(n_layer=2, d_model=64, n_head=4, n_kv_head=2, block_size=64, qk_norm=True, tie_embeddings=True),
            cfg,
        )
    return d / "run"


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    return {t: Path(export_gguf(run, out / t, t)["out"]) for t in ("f32", "f16", "q8_0")}


def test_the_file_says_what_llama_cpp_needs(run, exports):
    import gguf

    r = gguf.GGUFReader(exports["f16"])
    text = lambda k: bytes(r.fields[k].parts[r.fields[k].data[0]]).decode()  # noqa: E731
    value = lambda k: r.fields[k].parts[r.fields[k].data[0]][0]  # noqa: E731
    assert (
        text("general.architecture") == "llama"
        and text("tokenizer.ggml.pre") == "llama-bpe"
        and text("tokenizer.ggml.model") == "gpt2"
    )
    _, tok = load_model(run)
    assert value("tokenizer.ggml.eos_token_id") == tok.eot_id and not value("tokenizer.ggml.add_bos_token")
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"  # norms stay f32
    assert {
        t.tensor_type.name for t in gguf.GGUFReader(exports["q8_0"]).tensors if t.name.endswith("attn_q.weight")
    } == {"Q8_0"}
    assert "FROM ./model.gguf" in (exports["f16"].parent / "Modelfile").read_text()


def test_export_replaces_only_its_own_output(run, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["export", str(run), str(tmp_path / "mine"), "--format", "gguf"]) == 2
    assert "not a previous gradlm GGUF export" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "g"), "--format", "gguf", "--gguf-type", "q8_0"]) == 0
    # a previous export: replaced
    assert main(["export", str(run), str(tmp_path / "g"), "--format", "gguf", "--gguf-type", "f32"]) == 0
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["Modelfile", "model.gguf"]
    assert main(["export", str(run), str(tmp_path / "h"), "--format", "gguf", "--dtype", "float16"]) == 2
    assert "--gguf-type" in capsys.readouterr().err and not (tmp_path / "h").exists()


# ---- llama.cpp itself


def _llama(path: Path, **kw):
    """The model in llama.cpp on its plain CPU path: without the "extra buffer types" that repack the weights for
    AMX or AVX kernels (llama.cpp's AMX matrix product crashed the whole test run on a Sapphire Rapids Xeon, in
    q8_0: ggml-org/llama.cpp#20824). The plain path is the reference the others are checked against there."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the dev extra installs it)")
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as mp:  # Llama() reads the defaults while it loads, and offers no flag for this
        mp.setattr(llama_cpp.llama_cpp, "llama_model_default_params", without_repacking)
        return llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, n_batch=64, verbose=False, **kw)


def _gradlm_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()  # (T, V)


def test_llama_cpp_tokenizes_every_text_as_gradlm_does(run, exports):
    _, tok = load_model(run)
    llm = _llama(exports["f16"], vocab_only=True)
    for text in TEXTS:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tok.encode(text), text
        assert llm.detokenize(tok.encode(text)).decode("utf-8") == text


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_llama_cpp_decodes_the_exported_model_as_gradlm_does(run, exports, kind):
    model, tok = load_model(run)
    prompt = tok.encode("ROMEO:")
    ids = list(prompt)  # gradlm's greedy continuation, no cache: the reference
    while len(ids) < 60:
        ids.append(int(_gradlm_logits(model, ids)[-1].argmax()))
    ours = _gradlm_logits(model, ids)
    llm = _llama(exports[kind], logits_all=True)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))[:, : ours.shape[1]]
    diff = (theirs - ours).abs().max().item()
    # Teacher-forced, every position: the argmaxes agree wherever no difference as large as diff can reorder them
    # (a near-tie may go either way: which positions are near-ties depends on what this CPU's short run learned).
    sure = must_agree(ours, theirs)
    agree = theirs.argmax(-1) == ours.argmax(-1)
    print(
        f"{kind}: max logit diff {diff:.3g}, argmax agreement {agree.float().mean().item():.3f}, "
        f"{int(sure.sum())}/{len(ids)} positions sure"
    )
    assert agree[sure].all(), (kind, diff, (~agree).nonzero().flatten().tolist())
    if kind == "f32":
        # float32 in another summation order: ~1e-3 apart
        assert diff < 5e-3 and sure.float().mean() > 0.5, (diff, sure)
        # free-running greedy decoding in llama.cpp: gradlm's tokens, up to a near-tie where the paths may part
        llm.reset()
        llm.eval(prompt)
        out = list(prompt)
        while len(out) < 60:
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            llm.eval([nxt])
        parted = next((i for i, (a, b) in enumerate(zip(out, ids)) if a != b), None)
        same = parted or len(ids)  # up to here both read the same tokens: the same contexts, row by row
        free = torch.from_numpy(np.array(llm.scores[:same], dtype=np.float32))[:, : ours.shape[1]]
        assert (free - ours[:same]).abs().max() < 5e-3
        assert parted is None or not must_agree(ours[:same], free)[parted - 1], (parted, out, ids)
    else:
        # f16 and q8_0 round the weights; the README's ">= 95% agree" is measured by benchmarks/llamacpp.py
        assert diff < 0.5 and sure.float().mean() > 0.25, (kind, diff, sure)


def test_a_qk_norm_model_runs_as_qwen3_in_llama_cpp(qk_run, tmp_path):
    import gguf

    path = Path(export_gguf(qk_run, tmp_path / "q", "f32")["out"])
    r = gguf.GGUFReader(path)
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "qwen3"
    # tied head
    assert "blk.0.attn_q_norm.weight" in {t.name for t in r.tensors} and "output.weight" not in {
        t.name for t in r.tensors
    }
    model, tok = load_model(qk_run)
    ids = tok.encode("ROMEO: But soft")
    while len(ids) < 40:
        ids.append(int(_gradlm_logits(model, ids)[-1].argmax()))
    llm = _llama(path, logits_all=True)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    ours = _gradlm_logits(model, ids)
    assert (theirs[:, : ours.shape[1]] - ours).abs().max().item() < 5e-3


def test_the_chat_template_renders_gradlms_ids(run, tmp_path):
    pytest.importorskip("llama_cpp")
    import shutil

    import jinja2

    from gradlm.text.chat import write_chat_template

    chat_run = tmp_path / "chat"
    shutil.copytree(run, chat_run)
    write_chat_template(chat_run)  # as a chat fine-tune leaves it
    path = Path(export_gguf(chat_run, tmp_path / "g", "f16")["out"])
    llm = _llama(path, vocab_only=True)
    template = llm.metadata["tokenizer.chat_template"]
    _, tok = load_model(run)
    # (content that spells a special token is plain text in gradlm; llama.cpp's tokenizer, fed the rendered
    # string, would read it as the token: the server path in llama.cpp shares that limit with transformers)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Dose of zorvastatin? 🙂"},
        {"role": "assistant", "content": "40 mg"},
        {"role": "user", "content": "And ibuprofne?"},
    ]
    text = (
        jinja2.Environment()
        .from_string(template)
        .render(messages=messages, add_generation_prompt=True, bos_token="<|endoftext|>")
    )
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == encode_chat(tok, messages)
    assert json.loads(json.dumps(llm.metadata))["tokenizer.ggml.eot_token_id"] == str(tok.specials["<|end|>"])
