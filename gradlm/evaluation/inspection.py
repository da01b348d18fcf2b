"""Inside a trained model: what its attention looks at, where its embeddings put a token, and what it expects next.

    gradlm inspect runs/demo "ROMEO: What light" --attention att.png --neighbors love --lens

Three views of one forward pass over a text:
  attention      the attention probabilities of every layer and head, (layers, heads, T, T): row i is how much
                 position i reads each earlier position (causal: nothing after i). Computed from the model's own
                 projections (Attention.project), so it is exactly what the forward pass used.
  next tokens    at each position, the k most likely next tokens and their probabilities (the model's output);
                 with the logit lens (nostalgebraist, 2020), also each layer's guess: the residual stream after
                 that layer put through the final norm and the output head, which shows at which depth the
                 prediction forms.
  neighbours     the tokens whose input embeddings are nearest (cosine) to a token's: what the model learned
                 to treat alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradlm.errors import ConfigError
from gradlm.model.transformer import Transformer
from gradlm.text.tokenizer import Tokenizer, show_token


@dataclass
class Candidate:
    id: int
    text: str
    prob: float


def _ids(model: Transformer, tok: Tokenizer, text: str) -> torch.Tensor:
    ids = tok.encode(text)
    if not ids:
        raise ConfigError("the text is empty; give some text to look at")
    if len(ids) > model.cfg.block_size:
        raise ConfigError(
            f"the text is {len(ids)} tokens long, longer than the model's context window ({model.cfg.block_size}); "
            "shorten it"
        )
    return torch.tensor([ids], device=model.embed_tokens.weight.device)


@torch.no_grad()
def forward_views(model: Transformer, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One forward pass of idx (1, T) that also records each layer's attention probabilities and residual stream:
    (logits (T, V), attention (layers, heads, T, T), residual after each layer [(T, C)] * layers)."""
    attn, resid, hooks = [], [], []

    def record_attention(module, args):
        x, cos, sin = args[0], args[1], args[2]
        q, k, _ = module.project(x, cos, sin)
        k = k.repeat_interleave(module.n_head // module.n_kv_head, dim=1)  # grouped-query: each head its key
        scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(module.head_dim)
        T = scores.shape[-1]
        causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
        attn.append(scores.masked_fill(~causal, float("-inf")).softmax(-1)[0])

    for block in model.layers:
        hooks.append(block.self_attn.register_forward_pre_hook(record_attention))
        hooks.append(block.register_forward_hook(lambda m, a, out: resid.append(out[0].float())))
    was_training = model.training
    model.eval()
    try:
        logits = model(idx)[0].float()
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return logits, torch.stack(attn), resid


def top(probs: torch.Tensor, tok: Tokenizer, k: int) -> list[Candidate]:
    p, i = probs[: tok.vocab_size].topk(min(k, tok.vocab_size))
    return [Candidate(int(j), show_token(tok, int(j)), float(q)) for q, j in zip(p, i)]


def inspect_text(model: Transformer, tok: Tokenizer, text: str, k: int = 5, lens: bool = False) -> dict:
    """The views of one text: its tokens, the attention (layers, heads, T, T) as nested lists, the top-k next
    tokens at each position and, with lens, each layer's top guess at each position.

        >>> model, tok = load_model("runs/demo")                       # doctest: +SKIP
        >>> v = inspect_text(model, tok, "ROMEO: What light", lens=True)
        >>> v["next"][-1][0]                                            # the likeliest next token and its probability
    """
    if k < 1:
        raise ConfigError(f"--top must be at least 1, got {k}")
    idx = _ids(model, tok, text)
    logits, attention, resid = forward_views(model, idx)
    probs = logits.softmax(-1)
    out = {
        "tokens": [show_token(tok, int(i)) for i in idx[0]],
        "ids": idx[0].tolist(),
        "attention": attention.tolist(),
        "next": [[c.__dict__ for c in top(p, tok, k)] for p in probs],
    }
    if lens:
        with torch.no_grad():
            layer_logits = [model.lm_head(model.norm(r)).float() for r in resid]
        out["lens"] = [[top(lg[t].softmax(-1), tok, 1)[0].__dict__ for t in range(len(lg))] for lg in layer_logits]
    return out


def neighbors(model: Transformer, tok: Tokenizer, text: str, k: int = 10) -> list[dict]:
    """For each token of text: the k tokens whose input embeddings are nearest by cosine similarity (not itself)."""
    ids = tok.encode(text)
    if not ids:
        raise ConfigError("--neighbors needs a word or token; it was empty")
    emb = F.normalize(model.embed_tokens.weight[: tok.vocab_size].detach().float(), dim=-1)
    out = []
    for i in ids:
        sims = emb @ emb[i]
        sims[i] = -2.0  # not itself
        s, j = sims.topk(min(k, tok.vocab_size - 1))
        out.append(
            {
                "token": show_token(tok, i),
                "id": i,
                "nearest": [{"text": show_token(tok, int(b)), "id": int(b), "cosine": float(a)} for a, b in zip(s, j)],
            }
        )
    return out


def format_views(views: dict, layer: int | None = None) -> str:
    """The next-token table (and the lens, if computed) as text for the terminal."""
    lines = ["pos  token            next: top candidates"]
    for t, (name, cands) in enumerate(zip(views["tokens"], views["next"])):
        alts = "  ".join(f"{c['text']} {c['prob']:.1%}" for c in cands)
        lines.append(f"{t:>3}  {name:<16} {alts}")
    if "lens" in views:
        lines.append("")
        lines.append("logit lens: each layer's likeliest next token (last row: the model's output)")
        header = "layer " + " ".join(f"{n[:8]:>8}" for n in views["tokens"])
        lines.append(header)
        for li, row in enumerate(views["lens"]):
            lines.append(f"{li:>5} " + " ".join(f"{c['text'][:8]:>8}" for c in row))
    return "\n".join(lines)
