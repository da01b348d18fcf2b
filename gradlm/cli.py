"""The `gradlm` command: parse flags into configs, call one library function, print.

Flags and their --help come from the config dataclasses (ModelConfig, TrainConfig, SamplingConfig),
so the library and the CLI cannot drift apart. A GradlmError prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from gradlm.errors import ConfigError, GradlmError


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (exit 2), like every other user mistake."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def add_fields(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One --flag per dataclass field, typed by its default, helped by its docstring metadata."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            kind = int if f.name == "seed" else type(f.default)
            shown = "" if f.default in ("", None) else f" (default: {f.default})"
            p.add_argument(flag, type=kind, default=f.default, help=text + shown, metavar=f.name.upper())


def pick(args: argparse.Namespace, cls, **overrides):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


# ---- commands ----------------------------------------------------------------------------------------


def cmd_tokenizer_train(args) -> None:
    import time

    from gradlm.data import read_documents
    from gradlm.tokenizer import Tokenizer

    docs = read_documents(args.data, args.text_field)
    t0 = time.time()
    tok = Tokenizer.train((d.text for d in docs), args.vocab_size, show_progress=sys.stderr.isatty(), length=len(docs))
    dt = time.time() - t0
    out = Path(args.out)
    if out.is_dir():
        out = out / "tokenizer.json"
    tok.save(out)
    nbytes = sum(len(d.text.encode()) for d in docs)
    print(f"trained {tok.vocab_size} tokens ({tok.vocab_size - 256 - len(tok.specials)} merges + 256 bytes + {len(tok.specials)} special) on {nbytes:,} bytes in {dt:.2f}s -> {out}")


def _load_tokenizer(path: str):
    from gradlm.tokenizer import Tokenizer

    if not path:
        raise ConfigError("say which tokenizer: --tokenizer RUN_DIR or --tokenizer tokenizer.json")
    return Tokenizer.load(path)


def cmd_tokenize(args) -> None:
    from gradlm.tokenizer import describe

    tok = _load_tokenizer(args.tokenizer)
    text = args.text if args.text != "-" else sys.stdin.read()
    pieces = describe(tok, text)
    if args.ids:
        print(" ".join(str(i) for i, _ in pieces))
        return
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    palette = ["\x1b[30;48;5;153m", "\x1b[30;48;5;223m", "\x1b[30;48;5;194m", "\x1b[30;48;5;218m"]
    if color:  # the text itself, each token on its own background colour
        spans = [tok.decode([i]) for i, _ in pieces]
        print("".join(f"{palette[k % 4]}{s}\x1b[0m" for k, s in enumerate(spans)))
    for i, p in pieces:
        print(f"{i:>7}  {p}")
    nbytes = len(text.encode())
    print(f"{len(pieces)} tokens for {nbytes} bytes ({nbytes / max(len(pieces), 1):.2f} bytes/token)")


def cmd_prepare(args) -> None:
    from gradlm.data import prepare, read_documents
    from gradlm.tokenizer import Tokenizer

    docs = read_documents(args.data, args.text_field)
    if args.tokenizer:
        tok = _load_tokenizer(args.tokenizer)
    else:
        tok = Tokenizer.train((d.text for d in docs), args.vocab_size, length=len(docs))
    meta = prepare(args.data, tok, args.out, args.val_fraction, args.seed, args.text_field, args.workers, sys.stderr.isatty(), docs=docs)
    s = meta["splits"]
    print(f"{args.out}: {s['train']['tokens']:,} train tokens, {s['val']['tokens']:,} val tokens ({meta['dtype']}, split by {meta['split']})")


def cmd_train(args) -> None:
    from gradlm.model import ModelConfig
    from gradlm.train import TrainConfig, train

    model_cfg = pick(args, ModelConfig)
    cfg = pick(args, TrainConfig)
    s = train(model_cfg, cfg)
    print(
        f"{s['run']}: {s['steps']} steps, {s['tokens']:,} tokens in {s['time_s']:.0f}s ({s['tokens_per_s']:,.0f} tok/s), "
        f"stopped by {s['stop']} | val loss {s['val_loss']:.4f} | val bits per byte {s['val_bpb']:.4f}"
    )


def cmd_generate(args) -> None:
    from gradlm.generate import SamplingConfig, stream_text
    from gradlm.train import load_model

    model, tok = load_model(args.run, best=args.best)
    cfg = pick(args, SamplingConfig)
    out = sys.stdout
    for piece in stream_text(model, tok, args.prompt, cfg):
        out.write(piece)
        out.flush()
    out.write("\n")


# ---- wiring ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from gradlm.generate import SamplingConfig
    from gradlm.model import ModelConfig
    from gradlm.train import TrainConfig

    p = Parser(prog="gradlm", description="Train small GPT-style language models from your own text.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    tk = sub.add_parser("tokenizer", help="tokenizer tools")
    tks = tk.add_subparsers(dest="action", required=True, parser_class=Parser)
    t = tks.add_parser("train", help="train a byte-level BPE tokenizer and save tokenizer.json")
    t.add_argument("--data", required=True, help="text file, directory, .jsonl, .gz or a registered dataset name")
    t.add_argument("--vocab-size", type=int, default=1024, help="bytes + merges (256 = pure bytes)")
    t.add_argument("--out", default="tokenizer.json", help="where to write tokenizer.json")
    t.add_argument("--text-field", default="text", help="field holding the text in .jsonl input")
    t.set_defaults(func=cmd_tokenizer_train)

    t = sub.add_parser("tokenize", help="show how text splits into tokens")
    t.add_argument("text", help="text to tokenize ('-' reads standard input)")
    t.add_argument("--tokenizer", default="", help="a run directory or tokenizer.json")
    t.add_argument("--ids", action="store_true", help="print only the ids")
    t.set_defaults(func=cmd_tokenize)

    t = sub.add_parser("prepare", help="tokenise a corpus into train/val token files")
    t.add_argument("--data", required=True, nargs="+", help="text files, directories, .jsonl, .gz or registered names")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--tokenizer", default="", help="tokenizer to use (default: train one with --vocab-size)")
    t.add_argument("--vocab-size", type=int, default=1024, help="when training a tokenizer: bytes + merges")
    t.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out for validation")
    t.add_argument("--seed", type=int, default=0, help="seed of the document split")
    t.add_argument("--text-field", default="text", help="field holding the text in .jsonl input")
    t.add_argument("--workers", type=int, default=0, help="tokenising processes (0 = one per core)")
    t.set_defaults(func=cmd_prepare)

    t = sub.add_parser("train", help="train a model by gradient descent")
    add_fields(t, TrainConfig)
    add_fields(t, ModelConfig, skip=("vocab_size",))
    t.set_defaults(func=cmd_train)

    t = sub.add_parser("generate", help="write text with a trained model (streamed)")
    t.add_argument("run", help="run directory")
    t.add_argument("prompt", nargs="?", default="", help="text to continue (default: start of a document)")
    t.add_argument("--best", action="store_true", help="use best.safetensors (best validation loss)")
    add_fields(t, SamplingConfig)
    t.set_defaults(func=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except GradlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
