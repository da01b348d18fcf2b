import pytest
import torch
import torch.nn.functional as F

from gradlm.errors import ConfigError
from gradlm.model.transformer import Transformer, ModelConfig, dropout, explicit_causal_attention

from conftest import tiny_config

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice

VARIANTS = [
    dict(),
    dict(qk_norm=True, n_kv_head=2, tie_embeddings=True),
    dict(n_kv_head=1),
]


@pytest.mark.parametrize("kw", VARIANTS)
def test_causal_future_tokens_do_not_change_past_logits(kw):
    torch.manual_seed(0)
    m = Transformer(tiny_config(100, **kw)).eval()
    x = torch.randint(0, 100, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("kw", VARIANTS)
def test_kv_cache_matches_full_forward(kw):
    torch.manual_seed(0)
    m = Transformer(tiny_config(100, **kw)).eval()
    x = torch.randint(0, 100, (2, 24))
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2)
        parts = [m(x[:, :10], cache=cache), m(x[:, 10:17], cache=cache)]  # prefill, then a chunk
        parts += [m(x[:, t : t + 1], cache=cache) for t in range(17, 24)]  # then one at a time
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_left_padded_rows_match_unpadded():
    torch.manual_seed(0)
    m = Transformer(tiny_config(100)).eval()
    short, long_ = torch.randint(0, 100, (1, 5)), torch.randint(0, 100, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long_])
    with torch.no_grad():
        cache = m.new_cache(2, pad=[4, 0])
        got = m(batch, cache=cache)[:, -1]
        step = m(torch.tensor([[7], [7]]), cache=cache)[:, -1]
        ref_short = m(short)[:, -1]
        ref_step = m(torch.cat([short, torch.tensor([[7]])], 1))[:, -1]
    assert torch.allclose(got[0], ref_short[0], atol=1e-5)
    assert torch.allclose(got[1], m(long_)[0, -1], atol=1e-5)
    assert torch.allclose(step[0], ref_step[0], atol=1e-5)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = Transformer(tiny_config(64, d_model=64))
    x = torch.randint(0, 64, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(1000):  # ~200 steps get there; how many differs by CPU, so the test waits up to five times that
        loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < 0.1:
            break
    assert losses[-1] < 0.1, losses[::50]  # 128 random tokens memorised: the loss was ln 64 = 4.2 at the start


def test_loss_matches_cross_entropy_and_ignores_minus_one():
    torch.manual_seed(0)
    m = Transformer(tiny_config(50)).eval()
    x = torch.randint(0, 50, (2, 16))
    y = torch.randint(0, 50, (2, 16))
    y[0, :5] = -1
    with torch.no_grad():
        logits = m(x)
        ref = torch.nn.functional.cross_entropy(logits.view(-1, 50), y.view(-1), ignore_index=-1)
        per = m(x, y, reduction="none")
        assert torch.allclose(m(x, y), ref, atol=1e-6)
    assert per.shape == (2, 16) and (per[0, :5] == 0).all()


def test_counts_and_config():
    cfg = ModelConfig(vocab_size=1000, d_model=64, n_layer=2, n_head=4)
    m = Transformer(cfg)
    emb = 1000 * 64
    per_layer = 4 * 64 * 64 + 3 * 64 * cfg.d_ff + 2 * 64
    assert m.num_params() == 2 * emb + 2 * per_layer + 64
    assert m.num_params(non_embedding=True) == emb + 2 * per_layer + 64
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert m.flops_per_token(32) == 6 * (emb + 2 * (4 * 64 * 64 + 3 * 64 * cfg.d_ff)) + 12 * 2 * 64 * 32
    tied = Transformer(ModelConfig(vocab_size=1000, d_model=64, n_layer=2, n_head=4, tie_embeddings=True))
    assert tied.num_params() == emb + 2 * per_layer + 64 and tied.lm_head.weight is tied.embed_tokens.weight


def test_invalid_config_reports_all_problems():
    with pytest.raises(ConfigError) as e:
        Transformer(ModelConfig(d_model=30, n_head=4, dropout=2.0))
    assert "divisible" in str(e.value) and "dropout" in str(e.value)


def test_same_seed_same_weights():
    a, b = Transformer(tiny_config(50)), Transformer(tiny_config(50))
    a.reset_parameters(seed=1)
    b.reset_parameters(seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_explicit_attention_equals_sdpa(heads, kv_heads):
    """The bf16-on-CPU attention path is the same function as SDPA's causal attention, GQA included."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, heads, 12, 8), torch.randn(2, kv_heads, 12, 8), torch.randn(2, kv_heads, 12, 8)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(explicit_causal_attention(q, k, v), want, atol=1e-6, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = explicit_causal_attention(q, k, v)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.03, rtol=0.03)


def test_bf16_autocast_training_takes_the_explicit_path_and_matches_sdpa(monkeypatch):
    """Under bf16 autocast on CPU the model uses explicit_causal_attention (faster there); its loss and
    gradients agree with the SDPA path's to bf16 precision. Causality is kept (future tokens change nothing)."""
    import gradlm.model.transformer as model_module

    torch.manual_seed(0)
    model = Transformer(tiny_config(100))
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))
    calls = []
    real = model_module.explicit_causal_attention
    monkeypatch.setattr(model_module, "explicit_causal_attention", lambda *a: calls.append(1) or real(*a))

    def loss_and_grad():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, x)
        loss.backward()
        return loss.item(), model.layers[0].self_attn.q_proj.weight.grad.clone()

    explicit_loss, explicit_grad = loss_and_grad()
    assert len(calls) == 2  # one per layer
    monkeypatch.setattr(model_module, "EXPLICIT_ATTENTION_MAX_CONTEXT", 0)
    sdpa_loss, sdpa_grad = loss_and_grad()
    assert len(calls) == 2
    assert abs(explicit_loss - sdpa_loss) < 0.02
    assert torch.nn.functional.cosine_similarity(explicit_grad.flatten(), sdpa_grad.flatten(), dim=0) > 0.99
    monkeypatch.setattr(model_module, "EXPLICIT_ATTENTION_MAX_CONTEXT", 128)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        changed = x.clone()
        changed[:, 10:] = (changed[:, 10:] + 1) % model.cfg.vocab_size
        torch.testing.assert_close(model(x)[:, :10].float(), model(changed)[:, :10].float())


def test_dropout_drops_the_rounded_share_keeps_the_mean_and_follows_the_seed():
    x = torch.ones(200_000, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, 0.1, training=True)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 26 / 256) < 0.003  # p = 0.1 rounds to 26/256 on CPU
    assert abs(y.mean().item() - 1.0) < 0.01  # inverted dropout keeps the expectation
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient passes where the mask kept, with the same scale
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.1, training=True), y)
    assert not torch.equal(dropout(x, 0.1, training=True), y)
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0, training=True) is x
    assert (dropout(torch.ones(10_000), 0.5, training=True) == 0).float().mean().item() == pytest.approx(0.5, abs=0.03)


def test_a_compiled_model_without_noise_draws_its_dropout_eagerly_as_the_uncompiled_one():
    """Called compiled without the step's bytes, each dropout draws its own, outside the graph (a graph break), so
    the masks and the loss are the uncompiled model's."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layer=1, d_model=32, n_head=2, block_size=16, dropout=0.2)).train()
    x = torch.randint(0, 64, (2, 16))
    torch.manual_seed(1)
    eager = model(x, x)
    torch.manual_seed(1)
    compiled = torch.compile(model, backend="eager")(x, x)  # (dynamo only: no C++)
    assert torch.equal(compiled, eager)
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(x, x).graph_break_count > 0  # the bytes drawn outside the graph


@pytest.mark.parametrize("B, n_head, d_model, T", [(3, 2, 32, 16), (1, 3, 24, 5)])  # the second: odd counts
def test_dropout_bytes_drawn_before_a_bf16_forward_give_the_masks_it_draws_itself(B, n_head, d_model, T):
    """A compiled training step takes its dropout's random bytes as an input (drawn in one call before the step);
    under bf16 autocast they are the bytes the forward draws one dropout at a time (also where a dropout's count is
    not a multiple of four), so the loss is the same, and a forward given too few bytes says so."""
    from gradlm.model.transformer import random_bytes

    cfg = ModelConfig(vocab_size=64, n_layer=2, d_model=d_model, n_head=n_head, block_size=16, dropout=0.2)
    model = Transformer(cfg).train()
    x = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(0))
    whole = lambda n: 4 * ((n + 3) // 4)  # noqa: E731  (a dropout draws 32-bit words)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        n = model.dropout_bytes(B, T)
        assert n == 2 * (whole(B * n_head * T * T) + 2 * whole(B * T * d_model))  # a layer: probabilities, 2 branches
        torch.manual_seed(7)
        itself = model(x, x)
        after = torch.randint(0, 2**30, (4,))
        torch.manual_seed(7)
        given = model(x, x, noise=random_bytes(n))
        assert torch.equal(torch.randint(0, 2**30, (4,)), after)  # the generator moved on alike
        torch.manual_seed(8)
        other = model(x, x)
        with pytest.raises(ValueError, match="dropout bytes ran out"):
            model(x, x, noise=random_bytes(n - 8))
    assert torch.equal(given, itself) and not torch.equal(other, itself)
    assert model.dropout_bytes(B, T) == 2 * 2 * whole(B * T * d_model)  # float32: SDPA drops attention's itself
    assert Transformer(ModelConfig(vocab_size=64)).dropout_bytes(B, T) == 0  # no dropout
