"""Inside the model (gradlm/evaluation/inspection.py): attention maps that are exactly what the forward pass used,
next-token candidates equal to the model's output, a logit lens whose last layer is the output, nearest
neighbours in embedding space, and `gradlm inspect` with its mistakes."""

from __future__ import annotations

import json

import pytest
import torch

from gradlm.cli import main
from gradlm.evaluation.inspection import forward_views, inspect_text, neighbors
from gradlm.model.transformer import Transformer
from gradlm.training.config import TrainConfig
from gradlm.training.trainer import train

from conftest import tiny_config

TEXT = "the quick brown fox"


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = Transformer(tiny_config(tok.vocab_size, n_head=4, n_kv_head=2))  # grouped-query attention
    m.reset_parameters(seed=1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(6.0)  # peaked attention and outputs: far from uniform
    return m.eval()


def test_attention_is_causal_and_each_row_a_distribution(model, tok):
    idx = torch.tensor([tok.encode(TEXT)])
    _, att, _ = forward_views(model, idx)
    T = idx.shape[1]
    assert att.shape == (model.cfg.n_layer, model.cfg.n_head, T, T)
    assert torch.allclose(att.sum(-1), torch.ones(model.cfg.n_layer, model.cfg.n_head, T), atol=1e-5)
    assert not att.triu(1).any()  # nothing reads a later position
    assert att.max() > 0.5  # peaked somewhere: the check below is not comparing near-uniform maps


def test_attention_is_what_the_forward_pass_used(model, tok):
    """o_proj(probabilities @ values) recomputed from the maps equals the attention module's own output."""
    idx = torch.tensor([tok.encode(TEXT)])
    seen = {}
    attn0 = model.layers[0].self_attn
    hook = attn0.register_forward_hook(lambda m, args, out: seen.update(x=args[0], cos=args[1], sin=args[2], out=out))
    try:
        _, att, _ = forward_views(model, idx)
    finally:
        hook.remove()
    with torch.no_grad():
        _, _, v = attn0.project(seen["x"], seen["cos"], seen["sin"])
        v = v.repeat_interleave(attn0.n_head // attn0.n_kv_head, dim=1)
        y = att[0].unsqueeze(0) @ v  # (1, H, T, D)
        out = attn0.o_proj(y.transpose(1, 2).reshape(1, idx.shape[1], -1))
    assert torch.allclose(out, seen["out"], rtol=1e-4, atol=1e-5)


def test_next_tokens_and_the_lens_match_the_models_output(model, tok):
    views = inspect_text(model, tok, TEXT, k=3, lens=True)
    probs = model(torch.tensor([tok.encode(TEXT)]))[0].float().softmax(-1)
    for t, cands in enumerate(views["next"]):
        want_p, want_i = probs[t, : tok.vocab_size].topk(3)
        assert [c["id"] for c in cands] == want_i.tolist()
        assert [c["prob"] for c in cands] == pytest.approx(want_p.tolist(), rel=1e-5)
    assert len(views["lens"]) == model.cfg.n_layer
    assert [c["id"] for c in views["lens"][-1]] == [cands[0]["id"] for cands in views["next"]]  # last layer = output
    json.dumps(views)  # plain data: the CLI's --json prints it


def test_a_tokens_nearest_neighbour_is_the_one_embedded_alike(model, tok):
    (a,), (b,) = tok.encode("e"), tok.encode("t")  # one token each
    m = Transformer(model.cfg)
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        m.embed_tokens.weight[b] = 3.0 * m.embed_tokens.weight[a]  # same direction, another length
    (row,) = neighbors(m, tok, "e", k=4)
    assert row["nearest"][0]["id"] == b and row["nearest"][0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert all(n["id"] != a for n in row["nearest"])  # never itself


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("inspect") / "run"
    cfg = TrainConfig(data=str(text_file), out=str(out), vocab_size=300, max_steps=2, progress=False, plots=False)
    train(tiny_config(300), cfg)
    return out


def test_the_command_prints_the_views_and_draws_the_maps(run_dir, tmp_path, capsys):
    png = tmp_path / "att.png"
    assert main(["inspect", str(run_dir), "hello world", "--attention", str(png), "--lens", "--neighbors", "o"]) == 0
    out = capsys.readouterr().out
    assert "logit lens" in out and "nearest to" in out and png.is_file()
    assert main(["inspect", str(run_dir), "hello", "--json", "--top", "2"]) == 0
    views = json.loads(capsys.readouterr().out)
    assert len(views["next"][0]) == 2 and "attention" in views
    for bad, words in (
        (["hello", "--layer", "9"], "--layer 9: the model has"),
        (["hello", "--top", "0"], "--top must be at least 1"),
        (["x" * 4000], "longer than the model's context window"),
    ):
        assert main(["inspect", str(run_dir), *bad, "--attention", str(tmp_path / "no.png")]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and err.count("\n") == 1
        assert not (tmp_path / "no.png").exists()
