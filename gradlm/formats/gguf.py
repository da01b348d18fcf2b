"""Export a run to llama.cpp's GGUF, the file llama.cpp, Ollama and LM Studio run.

    runs/NAME/                               OUT/
      config.json, model.safetensors   ->      model.gguf   arch "llama" (or "qwen3" with --qk-norm), f32 / f16 / q8_0
      tokenizer.json                   ->
                                       tokenizer.ggml.*: byte-level BPE, gradlm's merges, pre "llama-bpe"
      chat_template.jinja (chat runs)  ->                   tokenizer.chat_template
                                               Modelfile    for `ollama create NAME -f OUT/Modelfile`

What has to change on the way (the rest is renaming):
- RoPE. gradlm, like Hugging Face's Llama, rotates the pair (i, i + head_dim/2) of each head; llama.cpp's
  "llama" architecture rotates neighbours (2i, 2i + 1). So the rows of q_proj and k_proj are reordered per
  head: the output written as row 2i is the model's row i, and row 2i + 1 is its row i + head_dim/2. The
  scores q.k are sums over the same pairs either way, so attention is unchanged. "qwen3" uses the
  half-split rotation itself: no reordering.
- The tokenizer. gradlm's pre-tokenizer pattern is, character for character, Llama 3's, which llama.cpp
  calls "llama-bpe"; the vocabulary and merges are written as they are in tokenizer.json; the six reserved
  tokens are control tokens (never produced from typed text); no BOS is added to a prompt, as gradlm adds
  none; <|endoftext|> ends a document and, in a chat-tuned run, <|end|> ends a turn (llama.cpp's EOT).
- Precision. f32 keeps every weight; f16 and q8_0 store the matrices so (q8_0: 32 weights share one scale),
  while the norms stay f32, as llama.cpp's own converter does. A matrix whose rows are not a multiple of 32
  wide cannot be q8_0 and is stored f16.

Example:
    >>> export_gguf("runs/drugqa-full", "gguf/drugqa", "q8_0")     # doctest: +SKIP
    $ llama-server -m gguf/drugqa/model.gguf --jinja
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from gradlm import files as ckpt
from gradlm.text.chat import END, ROLE_TOKENS, has_chat_tokens, read_chat_template
from gradlm.errors import ConfigError, TokenizerError
from gradlm.model.transformer import ModelConfig
from gradlm.formats.hf import check_export_target, load_for_export
from gradlm.rundir import package_version
from gradlm.text.tokenizer import EOT, Tokenizer

GGUF_TYPES = ("f32", "f16", "q8_0")
GGUF_FILES = ("model.gguf", "Modelfile")
MARKER = "gradlm.version"  # a key of our own in the file: llama.cpp ignores it; a re-export recognises its output
PRE_TOKENIZER = "llama-bpe"  # llama.cpp's name for Llama 3's split pattern, which is gradlm's


def rope_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection (heads * head_dim, d_model) from the half-split RoPE layout
    (pairs i, i + head_dim/2) to the interleaved one (pairs 2i, 2i + 1) within each head."""
    rows, cols = w.shape
    half = rows // heads // 2
    # (heads, half, 2, cols): i, i+half side by side
    return w.reshape(heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def _tensors(cfg: ModelConfig, state: dict[str, torch.Tensor], arch: str) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in Hugging Face layout) for every weight llama.cpp reads."""
    out = [("token_embd.weight", state["embed_tokens.weight"]), ("output_norm.weight", state["norm.weight"])]
    if not cfg.tie_embeddings:  # tied: llama.cpp reads the head from token_embd
        out.append(("output.weight", state["lm_head.weight"]))
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(cfg.n_layer):
        for ours, theirs in names.items():
            key = f"layers.{i}.{ours}"
            if key not in state:
                continue  # q_norm / k_norm exist only with --qk-norm
            t = state[key]
            if arch == "llama" and ours == "self_attn.q_proj.weight":
                t = rope_to_interleaved(t, cfg.n_head)
            elif arch == "llama" and ours == "self_attn.k_proj.weight":
                t = rope_to_interleaved(t, cfg.n_kv_head)
            out.append((f"blk.{i}.{theirs}", t))
    return out


def _vocabulary(tok: Tokenizer, vocab_size: int = 0) -> tuple[list[str], list[int], list[str]]:
    """Tokens in id order (tokenizer.json's byte-level strings), their llama.cpp types, and the merges;
    padded with unused tokens to vocab_size (llama.cpp wants a token for each row of the embedding)."""
    import gguf

    spec = json.loads(tok.to_json())
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    vocab.update(tok.specials)
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for piece, i in vocab.items():
        tokens[i] = piece
    missing = [i for i, t in enumerate(tokens) if not t]
    if missing:
        raise TokenizerError(f"the tokenizer has no token for ids {missing[:5]}; it cannot be written as GGUF")
    special = set(tok.specials.values())
    types = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    if n < vocab_size:  # the embedding has rows no token uses
        types += [int(gguf.TokenType.UNUSED)] * (vocab_size - n)
        tokens += [f"<|unused_{i}|>" for i in range(n, vocab_size)]
    return tokens, types, merges


def modelfile(chat: bool, gguf_type: str) -> str:
    """An Ollama Modelfile for OUT/model.gguf: the chat layout of gradlm/text/chat.py in Go template syntax for a
    chat-tuned run (stopping at <|end|>), plain completion otherwise."""
    lines = [
        f"# Ollama: ollama create NAME -f Modelfile   (written by gradlm {package_version()}, {gguf_type})",
        "FROM ./model.gguf",
    ]
    if chat:
        role = '{{ if eq .Role "system" }}%s{{ else if eq .Role "user" }}%s{{ else }}%s{{ end }}' % (
            ROLE_TOKENS["system"],
            ROLE_TOKENS["user"],
            ROLE_TOKENS["assistant"],
        )
        template = (
            EOT + "{{ range .Messages }}" + role + "{{ .Content }}" + END + "{{ end }}" + ROLE_TOKENS["assistant"]
        )
        lines += [f'TEMPLATE """{template}"""', f'PARAMETER stop "{END}"']
    else:
        lines += ['TEMPLATE """{{ .Prompt }}"""']
    lines += [f'PARAMETER stop "{EOT}"', ""]
    return "\n".join(lines)


def _written_by_gradlm(path: Path) -> bool:
    """Whether a GGUF file carries our marker key (any unreadable file is simply not ours)."""
    try:
        import gguf

        return path.is_file() and MARKER in gguf.GGUFReader(path).fields
    except Exception:  # noqa: BLE001  (the reader raises its own types for a file that is not GGUF)
        return False


def export_gguf(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, gguf_type: str = "f16", best: bool = False
) -> dict:
    """Write run_dir as OUT/model.gguf (+ an Ollama Modelfile); a LoRA run is folded into its base first.
    Returns a summary: the path, the architecture, the type, parameters and bytes."""
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    try:
        import gguf
    except ImportError:
        raise ConfigError(
            'GGUF export needs the gguf package (llama.cpp\'s writer): pip install gguf  (or pip install -e ".[gguf]")'
        ) from None
    out = Path(out_dir)
    check_export_target(out, GGUF_FILES, "model.gguf", _written_by_gradlm, "GGUF ")
    model, tok = load_for_export(run_dir, best, "llama.cpp")
    cfg = model.cfg
    arch = "qwen3" if cfg.qk_norm else "llama"
    vocabulary = _vocabulary(tok, cfg.vocab_size)
    template = read_chat_template(run_dir)  # a chat-tuned run keeps the template it was trained with
    chat = template is not None and has_chat_tokens(tok)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp / "model.gguf", arch)
        _add_model_keys(w, cfg, Path(run_dir).resolve().name, gguf_type)
        _add_tokenizer_keys(w, tok, vocabulary, template if chat else None)
        _add_tensors(w, _tensors(cfg, state, arch), gguf_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        ckpt.atomic_write_text(tmp / "Modelfile", modelfile(chat, gguf_type))

    ckpt.atomic_write_dir(out, write)
    return {
        "out": str(out / "model.gguf"),
        "architecture": arch,
        "gguf_type": gguf_type,
        "params": model.num_params(),
        "bytes": (out / "model.gguf").stat().st_size,
        "chat": chat,
    }


def _add_model_keys(w, cfg: ModelConfig, name: str, gguf_type: str) -> None:
    """The file's name, our marker, its type, and the model's shape."""
    import gguf

    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[gguf_type]
    w.add_name(name)
    w.add_string(MARKER, package_version())
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)


def _add_tokenizer_keys(
    w, tok: Tokenizer, vocabulary: tuple[list[str], list[int], list[str]], chat_template: str | None
) -> None:
    """The vocabulary (tokens, types, merges: `_vocabulary`) and special tokens; the chat template and <|end|>
    as EOT for a chat-tuned run (chat_template not None)."""
    tokens, types, merges = vocabulary
    w.add_tokenizer_model("gpt2")  # byte-level BPE
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.eot_id)  # a document starts after <|endoftext|>, but nothing is added to a prompt
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_eos_token_id(tok.eot_id)
    if "<|pad|>" in tok.specials:
        w.add_pad_token_id(tok.specials["<|pad|>"])
    if chat_template is not None:
        w.add_eot_token_id(tok.specials[END])
        w.add_chat_template(chat_template)


def _add_tensors(w, tensors: list[tuple[str, torch.Tensor]], gguf_type: str) -> None:
    """The weights in gguf_type: norms (1-d) always f32; a matrix too narrow for q8_0's blocks of 32 as f16."""
    import gguf

    for name, t in tensors:
        a = t.numpy()
        if a.ndim == 1 or gguf_type == "f32":
            w.add_tensor(name, a.astype(np.float32))
        elif gguf_type == "q8_0" and a.shape[-1] % 32 == 0:
            w.add_tensor(
                name,
                gguf.quants.quantize(a.astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            w.add_tensor(name, a.astype(np.float16))
