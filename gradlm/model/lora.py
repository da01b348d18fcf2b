"""Cheap fine-tuning: train a few parameters, keep the rest of a model as it is.

Two ways, chosen by `gradlm finetune --method`:

  freeze   train only the top N blocks, the final norm and the head; every other weight keeps its
           value bit for bit (requires_grad=False, so the optimizer never holds them).
  lora     low-rank adapters (Hu et al., 2021): a frozen projection W (out, in) gets a trainable
           update scale * B @ A with A (r, in), B (out, r) and scale = alpha / r, so it computes
               y = x W^T + scale * (dropout(x) A^T) B^T
           B starts at zero, so training starts from the base model exactly. Only A and B train:
           r * (in + out) numbers per projection instead of in * out.

The adapters are peft's (`inject_adapter_in_model`: our Transformer names its projections as Hugging Face's
Llama does, q_proj ... down_proj, plain nn.Linear without biases, which peft wraps as they are).
Loading a LoRA run does not need peft: fold_adapter adds scale * B @ A into W once, and the model
then runs as a plain Transformer (the fused generation path included). Importing peft costs ~3.5 s (it
imports transformers), which generate, eval and serve should not pay. tests/test_finetune.py checks
that the folded weights give peft's logits.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gradlm.errors import ConfigError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_targets(text: str) -> list[str]:
    """'q_proj,v_proj' -> ['q_proj', 'v_proj']; 'all' -> every projection. ConfigError names unknown ones."""
    names = list(LORA_TARGETS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown or not names:
        raise ConfigError(
            f"--lora-targets {text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}; choose from "
            f"{','.join(LORA_TARGETS)} (or all)"
        )
    return names


def add_adapters(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> nn.Module:
    """Wrap the target projections of every block with LoRA adapters (peft), in place; afterwards only
    the adapters require gradients. A's initial values come from torch's global generator (seed it)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError(
            "--method lora needs the peft package: pip install 'gradlm[lora]' (or pip install peft)"
        ) from None
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    return inject_adapter_in_model(config, model)


def adapter_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of a model with adapters: {"layers.0.self_attn.q_proj.lora_A.weight": A, ...}."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put saved adapter tensors back into a model with the same adapters; ValueError on any mismatch."""
    from peft import set_peft_model_state_dict

    own = adapter_weights(model)
    wrong = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if wrong:
        raise ValueError(f"the adapter does not fit: {', '.join(wrong[:3])}")
    set_peft_model_state_dict(model, state)


def fold_adapter(model: nn.Module, adapter: dict[str, torch.Tensor], scale: float) -> None:
    """W += scale * B @ A for every adapted projection of a plain model (no peft needed): afterwards the
    model computes what base + adapter computed. ValueError when the adapter does not fit the model."""
    params = dict(model.named_parameters())
    a_keys = [k for k in adapter if k.endswith(".lora_A.weight")]
    if not a_keys or len(adapter) != 2 * len(a_keys):
        raise ValueError("expected pairs of lora_A / lora_B tensors")
    with torch.no_grad():
        for key in a_keys:
            module = key.removesuffix(".lora_A.weight")
            A, B, W = adapter[key], adapter.get(module + ".lora_B.weight"), params.get(module + ".weight")
            if (
                B is None
                or W is None
                or A.dim() != 2
                or B.shape != (W.shape[0], A.shape[0])
                or A.shape[1] != W.shape[1]
            ):
                raise ValueError(
                    f"{module}: the adapter's A {tuple(A.shape)} and B {tuple(B.shape) if B is not None else None} do "
                    "not fit the weight"
                )
            W.add_((B.to(W.dtype) @ A.to(W.dtype)) * scale)


def freeze_below(model: nn.Module, trained_blocks: int) -> None:
    """Train only the top `trained_blocks` blocks, the final norm and the head; nothing else requires
    gradients. With tied embeddings the head is the input embedding, which then trains too."""
    n = len(model.layers)
    if not 0 <= trained_blocks <= n:
        raise ConfigError(
            f"--train-top {trained_blocks}: the model has {n} blocks; train between 0 (the head only) and {n} of them"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for part in [*model.layers[n - trained_blocks :], model.norm, model.lm_head]:
        for p in part.parameters():
            p.requires_grad_(True)


def count_params(model: nn.Module, trainable: bool = False) -> int:
    """Numbers in the model's parameters (tied ones once); trainable=True counts those that train."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen and (p.requires_grad or not trainable):
            seen.add(id(p))
            n += p.numel()
    return n
