import math

import pytest
import torch

from gradlm.errors import ConfigError
from gradlm.model.transformer import Transformer
from gradlm.training.optim import Combined, Muon, build_optimizer, lr_factor, orthogonalize

from conftest import tiny_config

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice


def test_schedules_have_their_defined_shapes():
    f = lambda p, **kw: lr_factor(p, step=1000, **kw)  # noqa: E731  (past any warmup)
    assert f(0.0, schedule="cosine") == 1 and f(1.0, schedule="cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert f(0.5, schedule="cosine", min_lr_ratio=0.0) == pytest.approx(0.5)
    assert f(0.25, schedule="linear", min_lr_ratio=0.0) == pytest.approx(0.75)
    assert f(0.7, schedule="wsd", decay_fraction=0.2) == 1.0
    assert f(0.9, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0) == pytest.approx(0.5)
    assert all(f(p, schedule="constant") == 1 for p in (0, 0.3, 1))
    assert lr_factor(0.0, 0, "constant", warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor(0.0, 9, "constant", warmup_steps=10) == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        lr_factor(0.5, 0, "exponential")


def test_orthogonalize_flattens_the_spectrum():
    torch.manual_seed(0)
    for shape in ((64, 32), (32, 96)):
        g = torch.randn(shape)
        s = torch.linalg.svdvals(orthogonalize(g))
        assert s.min() > 0.5 and s.max() < 1.3  # near 1 (5 quintic steps give roughly U(0.5, 1.5))
        s_bf16 = torch.linalg.svdvals(orthogonalize(g, dtype=torch.bfloat16).float())
        assert (s - s_bf16).abs().max() < 0.1  # bf16 and fp32 iterations agree
    ill = torch.randn(64, 32) @ torch.diag(torch.logspace(-2, 1, 32))  # condition number ~1000
    s = torch.linalg.svdvals(orthogonalize(ill))
    assert s.max() / s.min() < 30


def test_our_muon_matches_the_shipped_one_up_to_precision():
    torch.manual_seed(0)
    w0 = torch.randn(48, 32)
    grads = [torch.randn(48, 32) for _ in range(3)]
    results = []
    for cls, kw in ((Muon, {}), (torch.optim.Muon, {"adjust_lr_fn": "original"})):
        w = torch.nn.Parameter(w0.clone())
        opt = cls([w], lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, **kw)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        results.append(w.detach())
    assert (results[0] - results[1]).abs().max() < 2e-3  # the shipped one iterates in bf16


def test_weight_decay_only_on_matrices_and_muon_only_on_hidden_matrices():
    m = Transformer(tiny_config(50))
    opt = build_optimizer(m, "adamw", lr=1e-3, weight_decay=0.1)
    for g in opt.param_groups:
        assert all((p.dim() >= 2) == (g["weight_decay"] > 0) for p in g["params"])
    mu = build_optimizer(m, "muon")
    assert isinstance(mu, Combined)
    muon_params = {id(p) for p in mu.optimizers["muon"].param_groups[0]["params"]}
    names = {n for n, p in m.named_parameters() if id(p) in muon_params}
    assert names and all(n.startswith("layers.") and n.endswith("proj.weight") for n in names)
    assert "embed_tokens.weight" not in names and "lm_head.weight" not in names


def test_sgd_is_plain_gradient_descent():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    m = torch.nn.Module()
    m.w = w
    opt = build_optimizer(m, "sgd", lr=0.1, weight_decay=0.0)
    w.grad = torch.tensor([0.5, 0.5])
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([0.95, -2.05]))
    assert math.isclose(opt.param_groups[0]["momentum"], 0.0)
    assert build_optimizer(m, "nesterov").param_groups[0]["nesterov"]
