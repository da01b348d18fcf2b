"""Export to / import from the Hugging Face layout, so a gradlm run and a `transformers` checkpoint are
the same model in two folders.

gradlm's model is Llama's (Qwen3's with QK-norm) and its parameters carry the HF names minus the
"model." prefix, so the weights map one to one; the work is in the metadata around them:

    runs/NAME/                          HF_DIR/
      config.json  {"model": ...}  <->    config.json            LlamaForCausalLM / Qwen3ForCausalLM
      tokenizer.json               <->    tokenizer.json         (byte-level BPE, the same file)
      (tokenizer_config.json)      <->    tokenizer_config.json  special tokens, PreTrainedTokenizerFast
      model.safetensors            <->    model.safetensors      keys prefixed "model." (not lm_head)
                                          generation_config.json bos/eos/pad ids

Loading never executes code from the files: tensors come from safetensors, everything else from JSON,
and configs that ask for remote code (auto_map) are refused. Outputs are written into a temporary
folder beside the target and renamed into place, so a failure leaves nothing half-written.

Example:
    >>> export_hf("runs/shakespeare", "hf/shakespeare")                         # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained("hf/shakespeare")                  # doctest: +SKIP
    >>> import_hf("hf/tiny-llama", "runs/tiny-llama")                           # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer

from gradlm import files as ckpt
from gradlm.text.chat import CHAT_TEMPLATE, has_chat_tokens
from gradlm.errors import ConfigError, RunDirError, TokenizerError
from gradlm.model.transformer import Transformer, ModelConfig
from gradlm.text.tokenizer import EOT, Tokenizer
from gradlm.training.config import TrainConfig
from gradlm.rundir import RunDir, config_dict, load_model, package_version

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
SUPPORTED = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2"}
SUPPORTED_TEXT = (
    "gradlm imports LlamaForCausalLM, Qwen3ForCausalLM and Qwen2ForCausalLM without attention biases, with "
    "default RoPE (no rope_scaling), head_dim = hidden_size / num_attention_heads, SiLU, full attention, "
    "a single model.safetensors and a byte-level BPE tokenizer.json"
)
# transformers' defaults for keys a config.json may leave out (the three families agree on them).
_DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu"}
_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "qwen3": 32768}
_PAD = "<|pad|>"


# ---- export ------------------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, tok: Tokenizer, dtype: str = "float32") -> dict:
    """config.json for transformers: LlamaForCausalLM, or Qwen3ForCausalLM when the model has QK-norm.

    Both the old (rope_theta, torch_dtype) and the new (rope_parameters, dtype) spellings are written
    so transformers 4.x and 5.x read the same values.
    """
    eos = tok.eot_id
    pad = tok.specials.get(_PAD, eos)
    arch, model_type = ("Qwen3ForCausalLM", "qwen3") if cfg.qk_norm else ("LlamaForCausalLM", "llama")
    out = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        # Documents start after <|endoftext|> in gradlm's training data, so it is the BOS token too (as GPT-2).
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "dtype": dtype,
        "torch_dtype": dtype,
        "exported_by": f"gradlm {package_version()}",
    }
    if model_type == "llama":
        out.update(mlp_bias=False, pretraining_tp=1)
    else:
        out.update(
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=cfg.n_layer,
            layer_types=["full_attention"] * cfg.n_layer,
        )
    return out


def hf_tokenizer_config(tok: Tokenizer, block_size: int) -> dict:
    """tokenizer_config.json: a plain PreTrainedTokenizerFast over tokenizer.json, adding no BOS/EOS by
    itself and not "cleaning up" spaces on decode, so ids and text match gradlm's exactly; with gradlm's
    chat template (gradlm/text/chat.py) when the tokenizer has the chat tokens."""
    eos = tok.eos_token
    pad = _PAD if _PAD in tok.specials else eos
    extra = [s for s in tok.specials if s not in (eos, pad)]
    chat = {"chat_template": CHAT_TEMPLATE} if has_chat_tokens(tok) else {}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos,
        "eos_token": eos,
        "pad_token": pad,
        "additional_special_tokens": extra,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": block_size,
        **chat,
    }


def export_hf(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32", best: bool = False
) -> dict:
    """Write run_dir as a transformers checkpoint in out_dir; returns a summary.

    out_dir must be missing, empty, or a previous gradlm export (which is replaced whole).
    """
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    check_export_target(out, EXPORT_FILES, "config.json", _exported_by_gradlm)
    model, tok = load_for_export(run_dir, best, "transformers")
    cfg = model.cfg
    weights = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied: transformers rebuilds the head from model.embed_tokens.weight
        weights[name if name == "lm_head.weight" else "model." + name] = t.to(EXPORT_DTYPES[dtype]).contiguous()
    eos, pad = tok.eot_id, tok.specials.get(_PAD, tok.eot_id)

    def write(tmp: Path) -> None:
        ckpt.atomic_write_json(tmp / "config.json", hf_config(cfg, tok, dtype))
        ckpt.atomic_write_json(
            tmp / "generation_config.json", {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad}
        )
        ckpt.atomic_write_text(tmp / "tokenizer.json", tok.to_json())
        ckpt.atomic_write_json(tmp / "tokenizer_config.json", hf_tokenizer_config(tok, cfg.block_size))
        # transformers expects format=pt in the safetensors header.
        ckpt.save_weights(tmp / "model.safetensors", weights, {"format": "pt"})

    ckpt.atomic_write_dir(out, write)
    return {
        "out": str(out),
        "architecture": "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM",
        "dtype": dtype,
        "params": model.num_params(),
        "bytes": (out / "model.safetensors").stat().st_size,
    }


def load_for_export(run_dir: str | os.PathLike, best: bool, where: str) -> tuple[Transformer, Tokenizer]:
    """The run's model (a LoRA run folded into its base) and tokenizer, checked for what every export needs:
    an end-of-text token (the target's end of sequence) and a vocabulary the model covers."""
    model, tok = load_model(run_dir, best=best)
    if tok.eot_id < 0:
        raise TokenizerError(
            f"the tokenizer of {run_dir} has no end-of-text token ({EOT}); {where} needs an end-of-sequence token"
        )
    if tok.vocab_size > model.cfg.vocab_size:
        raise RunDirError(
            f"{run_dir}: the tokenizer has {tok.vocab_size} ids but the model only {model.cfg.vocab_size}"
        )
    return model, tok


def check_export_target(out: Path, files: tuple[str, ...], marker: str, is_ours, kind: str = "") -> None:
    """Refuse to replace anything but an empty folder or a previous export of this kind (which we may rewrite):
    one holding only `files`, whose `marker` file is_ours(path) says gradlm wrote."""
    ckpt.check_output(out, "the export target", is_dir=True)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} is a file; give a directory to export into")
    if not out.is_dir() or not any(out.iterdir()):
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in files)
    if foreign or not is_ours(out / marker):
        what = (
            f"it holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}"
            if foreign
            else f"its {marker} was not written by gradlm export"
        )
        raise RunDirError(
            f"{out} is not empty and not a previous gradlm {kind}export ({what}); export into a new or empty directory"
        )


def _exported_by_gradlm(config: Path) -> bool:
    try:
        return str(json.loads(config.read_text(encoding="utf-8")).get("exported_by", "")).startswith("gradlm")
    except (OSError, ValueError, AttributeError):
        return False


# ---- import ------------------------------------------------------------------------------------------


def _hf_architecture(hf: dict) -> str:
    """The supported architecture a config.json names, once it is known to give every size; ConfigError otherwise."""
    if "auto_map" in hf:
        raise ConfigError(f"config.json asks for custom code (auto_map), which gradlm never runs; {SUPPORTED_TEXT}")
    archs = hf.get("architectures") or []
    if not archs and "model" in hf:
        raise ConfigError(f"this config.json is a gradlm run's, not a Hugging Face checkpoint's; {SUPPORTED_TEXT}")
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 else None
    if arch not in SUPPORTED:
        raise ConfigError(f"unsupported architecture {archs or hf.get('model_type')!r}; {SUPPORTED_TEXT}")
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    bad = [k for k in sizes if not isinstance(hf.get(k), int) or isinstance(hf.get(k), bool) or hf[k] < 1]
    if bad:
        raise ConfigError(f"config.json lacks positive integers for {', '.join(bad)}; is it a complete {arch} config?")
    return arch


def model_config_from_hf(hf: dict, block_size: int = 0) -> tuple[ModelConfig, str]:
    """(ModelConfig, architecture) for a transformers config.json dict; ConfigError listing every
    feature gradlm's model does not have (biases, rope scaling, sliding windows, ...)."""
    arch = _hf_architecture(hf)
    family = SUPPORTED[arch]

    def get(key: str):
        return hf[key] if hf.get(key) is not None else _DEFAULTS.get(key)

    problems = []
    if hf.get("model_type", family) != family:
        problems.append(f"model_type {hf.get('model_type')!r} does not match {arch}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention/MLP biases")
    if get("hidden_act") != "silu":
        problems.append(f"activation {get('hidden_act')!r} (SiLU only)")
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if hf.get("rope_scaling") or rope_type != "default" or partial != 1.0:
        problems.append(f"rope_scaling / rope type {hf.get('rope_scaling') or rope_type!r} (default RoPE only)")
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
        problems.append("sliding-window attention")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") is not None and hf["head_dim"] * heads != hidden:
        problems.append(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads ({hidden} / {heads})")
    if problems:
        raise ConfigError(
            f"{arch} checkpoint uses what gradlm's model does not have: {'; '.join(problems)}. {SUPPORTED_TEXT}"
        )
    max_pos = hf.get("max_position_embeddings") or _MAX_POSITIONS[family]
    if block_size and not 0 < block_size <= max_pos:
        raise ConfigError(
            f"--block-size must be between 1 and the checkpoint's max_position_embeddings ({max_pos}), got {block_size}"
        )
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"],
        block_size=block_size or max_pos,
        n_layer=hf["num_hidden_layers"],
        n_head=heads,
        n_kv_head=hf.get("num_key_value_heads") or heads,
        d_model=hidden,
        d_ff=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta") or get("rope_theta")),
        norm_eps=float(get("rms_norm_eps")),
        qk_norm=family == "qwen3",
        tie_embeddings=bool(get("tie_word_embeddings")),
        dropout=0.0,
    )
    cfg.validate()
    return cfg, arch


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of a single-file safetensors checkpoint, with a clear error for every other layout."""
    path = hf_dir / "model.safetensors"
    if not path.is_file():
        if (hf_dir / "model.safetensors.index.json").is_file() or list(hf_dir.glob("model-*-of-*.safetensors")):
            why = "the checkpoint is sharded (model.safetensors.index.json); gradlm imports one model.safetensors"
        elif list(hf_dir.glob("*.bin")) or list(hf_dir.glob("*.pt")) or list(hf_dir.glob("*.pth")):
            why = (
                "it has only pickled weights (*.bin/*.pt), which gradlm never loads because unpickling can run code; "
                "convert them to model.safetensors"
            )
        else:
            why = "no model.safetensors"
        raise RunDirError(f"cannot import {hf_dir}: {why}. {SUPPORTED_TEXT}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise RunDirError(f"cannot read {path} ({e}); the file is corrupt or not safetensors") from None


def gradlm_state(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensor names -> gradlm names, as float32 (gradlm trains in fp32); a tied head is stored once."""
    biases = sorted(k for k in hf_state if k.endswith(".bias"))
    if biases:
        raise ConfigError(
            f"the checkpoint has bias tensors ({biases[0]}, ...), which gradlm's model does not have. {SUPPORTED_TEXT}"
        )
    state = {}
    for k, t in hf_state.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue  # older checkpoints store RoPE's frequencies; gradlm recomputes them
        if k == "lm_head.weight" and cfg.tie_embeddings:
            continue  # transformers ignores a stored head when tied; so do we
        state[k.removeprefix("model.")] = t.float()
    # Check names and shapes against the model without allocating it (meta tensors have no storage).
    with torch.device("meta"):
        skeleton = Transformer(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying into meta parameters is a no-op, which torch warns about
        try:
            skeleton.load_weights(state)
        except ValueError as e:
            raise RunDirError(f"model.safetensors does not match its config.json: {e}") from None
    return state


def _import_tokenizer(hf_dir: Path, hf: dict) -> Tokenizer:
    """tokenizer.json as a gradlm Tokenizer, refusing anything that is not byte-level BPE."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        found = [n for n in ("tokenizer.model", "vocab.json", "spiece.model") if (hf_dir / n).is_file()]
        hint = (
            f" (it has {', '.join(found)}: load it with transformers and save_pretrained to get tokenizer.json)"
            if found
            else ""
        )
        raise TokenizerError(f"cannot import {hf_dir}: no tokenizer.json{hint}. {SUPPORTED_TEXT}")
    tk_cfg = _json_file(hf_dir / "tokenizer_config.json") if (hf_dir / "tokenizer_config.json").is_file() else {}
    if "auto_map" in tk_cfg:
        raise ConfigError(
            f"tokenizer_config.json asks for custom code (auto_map), which gradlm never runs; {SUPPORTED_TEXT}"
        )
    spec = _json_file(path)
    model_type = (spec.get("model") or {}).get("type")
    if model_type != "BPE" or not (_has_byte_level(spec.get("pre_tokenizer")) and _has_byte_level(spec.get("decoder"))):
        raise TokenizerError(f"{path} is not a byte-level BPE tokenizer (model {model_type!r}); {SUPPORTED_TEXT}")
    try:
        hf_tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # the HF loader raises plain Exceptions with its parser message
        raise TokenizerError(f"cannot read tokenizer {path}: {e}") from None
    probe = Tokenizer(hf_tok)
    if probe.eot_id >= 0:
        return probe
    # No <|endoftext|>: the run ends documents with the checkpoint's own eos token instead.
    eos = tk_cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if not isinstance(eos, str) or hf_tok.token_to_id(eos) is None:
        eos_id = hf.get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        eos = hf_tok.id_to_token(eos_id) if isinstance(eos_id, int) else None
    if eos is None:
        raise TokenizerError(
            f"cannot import {hf_dir}: the tokenizer has no {EOT} and neither tokenizer_config.json (eos_token) nor "
            "config.json (eos_token_id) names an end-of-text token"
        )
    return Tokenizer(hf_tok, eos_token=eos)


def _has_byte_level(component) -> bool:
    """Whether a tokenizer.json pre-tokenizer/decoder is (or contains, in a Sequence) ByteLevel."""
    if not isinstance(component, dict):
        return False
    if component.get("type") == "ByteLevel":
        return True
    parts = component.get("pretokenizers") or component.get("decoders") or []
    return any(_has_byte_level(p) for p in parts)


def _json_file(path: Path) -> dict:
    obj = ckpt.read_json(path, path.name)
    if not isinstance(obj, dict):
        raise RunDirError(f"{path} is not a JSON object; the file is corrupt")
    return obj


def import_hf(hf_dir: str | os.PathLike, run_dir: str | os.PathLike, block_size: int = 0) -> dict:
    """Turn a local transformers checkpoint into a gradlm run directory; returns a summary.

    block_size caps the context window (default: the checkpoint's max_position_embeddings); the KV cache
    of generation is allocated for that many positions.
    """
    src, out = Path(hf_dir), Path(run_dir)
    if not (src / "config.json").is_file():
        raise RunDirError(f"{src} is not a Hugging Face checkpoint directory (no config.json)")
    ckpt.check_output(out, "the run directory", is_dir=True)
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out} already exists and is not empty; import into a new run directory")
    hf = _json_file(src / "config.json")
    cfg, arch = model_config_from_hf(hf, block_size)
    tok = _import_tokenizer(src, hf)
    if tok.vocab_size > cfg.vocab_size:
        raise TokenizerError(f"the tokenizer has {tok.vocab_size} ids but the model's vocab_size is {cfg.vocab_size}")
    state = gradlm_state(_read_hf_weights(src), cfg)
    run_config = config_dict(
        cfg,
        asdict(TrainConfig(out=str(out))),
        {"tokenizer": "given", "tokenizer_sha256": tok.sha256},
        imported_from={"path": str(src.resolve()), "architecture": arch},
    )
    RunDir.create(out, run_config, tok, state, step=0)
    return {
        "run": str(out),
        "architecture": arch,
        "params": sum(t.numel() for t in state.values()),
        "eos_token": tok.eos_token,
    }
