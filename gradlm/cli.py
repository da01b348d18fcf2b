"""The `gradlm` command: parse flags into configs, call one library function, print.

The flags of the training commands (train, finetune, lr-find, compare, sweep), of generate and chat
and of eval come from the config dataclasses (ModelConfig, TrainConfig, FinetuneConfig, SamplingConfig,
EvalConfig): their names, types, defaults and help are the library's. The other flags are declared below,
command by command. A GradlmError prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from gradlm.errors import ConfigError, ConstraintError, GradlmError, Interrupted, flag


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (exit 2), like every other user mistake.

    Flags are matched by their whole name only (no prefixes: `--optim` is not `--optimizer`), and a value
    that starts with a minus and a digit (-1m, -5, -1e-3) is a value, so `--max-time -1m` reaches the check
    that explains why a budget must be positive instead of "expected one argument"."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def add_fields(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), typed_only: bool = False) -> None:
    """One --flag per dataclass field, typed by its default, helped by its docstring metadata.

    typed_only: a flag left out is absent from the parsed namespace (argparse.SUPPRESS) rather than
    set to its default, so the command knows exactly which flags the user typed (resume overrides)."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        spelled = flag(f.name)
        text = f.metadata.get("help", "")
        default = argparse.SUPPRESS if typed_only else f.default
        if isinstance(f.default, bool):
            p.add_argument(
                spelled,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=text + (f" (default: {f.default})" if typed_only else ""),
            )
        else:
            kind = int if f.name == "seed" else type(f.default)
            shown = "" if f.default in ("", None) else f" (default: {f.default})"
            p.add_argument(spelled, type=kind, default=default, help=text + shown, metavar=f.name.upper())


def add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default="",
        metavar="FILE",
        help="read settings from a TOML, YAML or JSON file (keys are the flags without '--'; a run's config.json "
        "works); flags typed here win",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings (as YAML, which --config reads back) and exit",
    )


def given_configs(args: argparse.Namespace, *classes) -> tuple[list, set[str]]:
    """Instances of the config classes from --config FILE and the flags typed (flags win), and the names
    of every setting given either way (what a resume may take as an override)."""
    from gradlm.training.config import read_config_file

    values = read_config_file(args.config, classes) if getattr(args, "config", "") else {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if hasattr(args, f.name):
                values[f.name] = getattr(args, f.name)
    objs = [cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}) for cls in classes]
    _check_typed_budgets(args, objs)
    if getattr(args, "print_config", False):
        import yaml

        sections = {"ModelConfig": "model", "TrainConfig": "train", "FinetuneConfig": "finetune"}
        print(
            yaml.safe_dump(
                {sections.get(type(o).__name__, type(o).__name__): dataclasses.asdict(o) for o in objs}, sort_keys=False
            ),
            end="",
        )
        raise SystemExit(0)
    return objs, set(values)


def _check_typed_budgets(args: argparse.Namespace, objs) -> None:
    """A budget typed on the command line must be positive (`--max-time 0` is a mistake, not "no limit").
    A config file's 0 or "" means "not set": that is how --print-config and a run's config.json write it."""
    from gradlm.training.config import BUDGETS, TrainConfig, check_budgets

    for o in objs:
        if isinstance(o, TrainConfig):
            check_budgets(o, {b for b in BUDGETS if hasattr(args, b)})


def add_runtime_flags(p: argparse.ArgumentParser, decoding: bool = False, merge: bool = False) -> None:
    """--device, --dtype and --compile of a command that runs a trained model (gradlm/runtime.py)."""
    from gradlm.runtime import COMPILE, DEVICE_HELP

    if merge:
        dtype = "auto or float32: the adapter is folded into float32 weights, saved so like every run's"
        compiled = "accepted like everywhere; merge runs no forward pass, so nothing is compiled"
    else:
        dtype = "the weights while the model runs: float32, bfloat16" + (
            ", or int8 (CPU: int8 copies of the matrices, faster, see docs/benchmarks.md); auto = bfloat16 on "
            "CUDA, int8 on a CPU with AVX512 (1.4x float32 at batch 1, +0.0001 bits per byte), float32 on other "
            "CPUs; float32 is the exact reference"
            if decoding
            else "; auto = bfloat16 on CUDA, float32 on the CPU"
        )
        compiled = (
            "on, off or auto. On the CPU: the decoding step compiled ahead of time (1.4-1.7x eager's tokens/s at "
            "batch 1, float32 and int8; a ~20 s build once per model shape, ~40 s for float32 on a CPU not "
            "Intel's, kept in $GRADLM_CACHE/aot): on = built "
            "before the first token if missing, auto = used when built (serve and chat build it in the background "
            "the first time). On CUDA: on = the one-token step recorded as CUDA graphs (no compiler), auto = off"
            if decoding
            else "on, off or auto (= off): torch.compile the scored forward pass"
        )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", help=dtype)
    p.add_argument("--compile", default="auto", choices=COMPILE, help=compiled)


def model_runtime(args: argparse.Namespace, decoding: bool = False, serving: bool = False):
    """The Runtime of a command that runs a trained model, from its --device, --dtype and --compile (serving: one
    that keeps running, serve and chat)."""
    from gradlm.runtime import resolve

    return resolve(args.device, args.dtype, args.compile, inference=True, decoding=decoding, serving=serving)


def pick(args: argparse.Namespace, cls, **overrides):
    """An instance of the dataclass cls from the parsed flags it has (fields not present keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


# ---- commands ----------------------------------------------------------------------------------------


def constraint_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--choices",
        default="",
        metavar="FILE",
        help="constrain the output to one of the lines of FILE (one choice per line)",
    )
    p.add_argument(
        "--regex", default="", metavar="R", help="constrain the output to match this regular expression whole"
    )
    p.add_argument(
        "--json-schema",
        default="",
        metavar="FILE",
        help="constrain the output to JSON valid against the JSON schema in FILE",
    )
    p.add_argument("--json-object", action="store_true", help="constrain the output to any JSON object")
    p.add_argument("--grammar", default="", metavar="FILE", help="constrain the output to the Lark grammar in FILE")


def constraint_args(args: argparse.Namespace) -> dict:
    """The constraint the flags ask for, as LM keywords (choices=..., regex=...); {} when none."""
    from gradlm.generation.constrain import make_constraint
    from gradlm.text.corpus import read_text

    def read(path: str, what: str) -> str:
        if not Path(path).is_file():
            raise ConfigError(f"no {what} file at {path}")
        return read_text(Path(path))

    given = {}
    if args.choices:
        given["choices"] = [ln.strip() for ln in read(args.choices, "choices").splitlines() if ln.strip()]
        if not given["choices"]:
            raise ConfigError(f"{args.choices} holds no choices: write one per line")
    if args.regex:
        given["regex"] = args.regex
    if args.json_schema:
        given["json_schema"] = read(args.json_schema, "JSON schema")
    if args.json_object:
        given["json_object"] = True
    if args.grammar:
        given["grammar"] = read(args.grammar, "grammar")
    c = make_constraint(**given)
    return {} if c is None else {c.kind: c.value}


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def cmd_tokenizer_train(args) -> None:
    from gradlm.files import check_output
    from gradlm.text.prepare import parse_size, train_tokenizer

    out = Path(args.out)
    out = check_output(out / "tokenizer.json" if out.is_dir() else out, "--out")
    tok = train_tokenizer(
        args.data,
        args.vocab_size,
        parse_size(args.tokenizer_sample, "--tokenizer-sample"),
        args.text_field,
        args.encoding_errors,
        _stderr,
        progress=sys.stderr.isatty(),
    )
    tok.save(out)
    print(
        f"{out}: {tok.vocab_size} tokens ({tok.vocab_size - 256 - len(tok.specials)} merges + 256 bytes + "
        f"{len(tok.specials)} special)"
    )


def _load_tokenizer(path: str):
    from gradlm.text.tokenizer import Tokenizer

    if not path:
        raise ConfigError("say which tokenizer: --tokenizer RUN_DIR or --tokenizer tokenizer.json")
    return Tokenizer.load(path)


def cmd_tokenize(args) -> None:
    from gradlm.text.tokenizer import describe

    tok = _load_tokenizer(args.tokenizer)
    text = args.text if args.text != "-" else sys.stdin.read()
    pieces = describe(tok, text, allow_special=args.allow_special)
    if args.typos < 0:
        raise ConfigError(f"--typos is how many misspellings to show and must not be negative, got {args.typos}")
    typos = []
    if args.typos:  # made before anything is printed: a text that cannot be misspelled is an error
        from gradlm.evaluation.robustness import typo_splits

        typos = typo_splits(tok, text, args.typos, args.seed)
    if args.ids:
        print(" ".join(str(i) for i, _ in pieces))
        for t in typos:
            print(" ".join(map(str, t.ids)))
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
    if typos:
        from gradlm.text.tokenizer import show_token

        print(f"with one typo (seed {args.seed}):")
        for t in typos:
            print(f"  {t.kind:<8} {t.text!r} -> {len(t.ids)} tokens: {' '.join(show_token(tok, i) for i in t.ids)}")


def cmd_prepare(args) -> None:
    from gradlm.files import check_output
    from gradlm.text.prepare import parse_size, prepare, train_tokenizer

    check_output(args.out, "--out", is_dir=True)
    if args.shard_tokens < 1:
        raise ConfigError(f"--shard-tokens must be positive, got {args.shard_tokens}")
    if args.tokenizer:
        tok = _load_tokenizer(args.tokenizer)
    else:
        tok = train_tokenizer(
            args.data,
            args.vocab_size,
            parse_size(args.tokenizer_sample, "--tokenizer-sample"),
            args.text_field,
            args.encoding_errors,
            _stderr,
        )
    meta = prepare(
        args.data,
        tok,
        args.out,
        args.val_fraction,
        args.seed,
        args.text_field,
        args.workers,
        sys.stderr.isatty(),
        errors=args.encoding_errors,
        shard_tokens=args.shard_tokens,
        log=_stderr,
    )
    s = meta["splits"]
    print(
        f"{args.out}: {s['train']['tokens']:,} train tokens in {_count(len(s['train']['shards']), 'shard')}, "
        f"{s['val']['tokens']:,} val tokens "
        f"({meta['dtype']}, split by {meta['split']}; {_count(meta['documents'], 'document')}, "
        f"{meta['skipped_documents']:,} skipped, "
        f"{meta['replaced_characters']:,} undecodable sequences replaced)"
    )


def cmd_train(args) -> None:
    from gradlm.model.transformer import ModelConfig
    from gradlm.training.config import TrainConfig
    from gradlm.training.trainer import train

    (model_cfg, cfg), given = given_configs(args, ModelConfig, TrainConfig)
    with watching(args, cfg.out):
        s = train(model_cfg, cfg, given=given)
    import torch.distributed as dist

    if dist.is_initialized():  # under torchrun: only rank 0 reports
        rank = dist.get_rank()
        dist.barrier()  # leave together: rank 0 may still be writing the summary
        dist.destroy_process_group()
        if rank != 0:
            return
    print(
        f"{s['run']}: {s['steps']} steps, {s['tokens']:,} tokens in {s['time_s']:.1f}s ({s['tokens_per_s']:,.0f} "
        "tok/s), "
        f"stopped by {s['stop']} | val loss {s['val_loss']:.4f} | val bits per byte {s['val_bpb']:.4f}"
    )


def cmd_finetune(args) -> None:
    from gradlm.training.config import TrainConfig
    from gradlm.training.finetune import FinetuneConfig, finetune

    given = {f.name for cls in (TrainConfig, FinetuneConfig) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    if not getattr(args, "resume", False) and "data" not in given:
        raise ConfigError("say what to fine-tune on: --data FILE (chat .jsonl for question answering, or raw text)")
    dropout = getattr(args, "dropout", 0.0)
    ft_train = pick(args, TrainConfig)
    _check_typed_budgets(args, [ft_train])
    with watching(args, ft_train.out):
        s = finetune(
            args.base,
            ft_train,
            pick(args, FinetuneConfig),
            dropout=dropout,
            given=given | ({"dropout"} if hasattr(args, "dropout") else set()),
        )
    print(
        f"{s['run']}: {s['finetune_method']} fine-tuning, {s['trainable_params']:,} trainable parameters of "
        f"{s['full_finetune_params']:,}, "
        f"{s['steps']} steps in {s['time_s']:.1f}s, stopped by {s['stop']} | val loss {s['val_loss']:.4f} (best "
        f"{s['best_val_loss']:.4f})"
    )


def cmd_merge(args) -> None:
    from gradlm.training.finetune import merge

    from gradlm.runtime import resolve

    rt = resolve(args.device, "float32" if args.dtype == "auto" else args.dtype, args.compile, inference=True)
    if rt.dtype != "float32":
        raise ConfigError(
            f"--dtype {args.dtype}: merge folds the adapter into float32 weights and saves them so, as every run is; "
            "leave --dtype out"
        )
    s = merge(args.run, args.out, best=args.best, device=rt.device)
    print(f"{s['run']}: {s['params']:,} parameters, the base weights with {s['from']} folded in")


def cmd_chat(args) -> None:
    from gradlm.generation.generate import SamplingConfig, load
    from gradlm.generation.session import ChatSession, chat_loop

    sampling = pick(args, SamplingConfig)
    sampling.validate()
    from gradlm.generation.constrain import make_constraint

    constraint = make_constraint(**constraint_args(args))
    lm = load(args.run, best=args.best, runtime=model_runtime(args, serving=True))
    session = ChatSession(lm, system=args.system, sampling=sampling, constraint=constraint)

    if not lm.chat:
        print(
            f"note: {args.run} was never fine-tuned for chat (it has no chat template), so it continues the "
            "conversation as text rather than answering; fine-tune it with `gradlm finetune`",
            file=sys.stderr,
        )
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            f"chatting with {args.run} (context window {session.window} tokens): /reset starts over, /quit or Ctrl-D "
            "leaves",
            file=sys.stderr,
        )
    chat_loop(session, interactive=interactive)


def cmd_generate(args) -> None:
    from gradlm.generation.generate import SamplingConfig, load, read_prompts
    from gradlm.text.tokenizer import show_token

    cfg = pick(args, SamplingConfig)
    cfg.validate()
    constrain = constraint_args(args)
    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if args.batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {args.batch}")
    lm = load(args.run, best=args.best, allow_special=args.allow_special, runtime=model_runtime(args, decoding=True))
    out = sys.stdout
    if len(prompts) <= 1 and not args.logprobs:  # one prompt: stream the text as it is written
        for piece in lm.stream(prompts[0] if prompts else "", cfg, truncate=args.truncate, **constrain):
            out.write(piece)
            out.flush()
        out.write("\n")
        return
    prompts = prompts or [""]
    failed = []
    for start in range(0, len(prompts), args.batch):  # several prompts: decoded together, --batch at a time
        for k, c in enumerate(
            lm.complete(
                prompts[start : start + args.batch], cfg, logprobs=args.logprobs, truncate=args.truncate, **constrain
            ),
            start + 1,
        ):
            if c.error:
                failed.append(f"prompt {k}: {c.error}" if len(prompts) > 1 else c.error)
            if len(prompts) > 1:
                out.write(f"--- {k}/{len(prompts)}: {c.prompt[:60]!r} ---\n")
            out.write(c.text + "\n")
            for i, t in enumerate(c.logprobs or [], 1):
                alts = "  ".join(f"{show_token(lm.tok, j)} {math.exp(lp):.1%}" for j, _, lp in t.top)
                out.write(f"{i:>5}  {show_token(lm.tok, t.id):<16} {t.prob:7.2%}   {alts}\n")
            if args.logprobs:
                out.write(
                    f"[{len(c.token_ids)} tokens, finished by {c.finish_reason}; probabilities are the model's, "
                    "before sampling controls]\n"
                )
            out.flush()
    if failed:  # every other prompt's text is written; the ones that do not fit the constraint fail the command
        raise ConstraintError(failed[0] + (f" (and {len(failed) - 1} more prompts)" if len(failed) > 1 else ""))


def watch_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--watch",
        action="store_true",
        help="serve a live page of this run (gradlm watch) while it trains, and print its address",
    )
    p.add_argument("--watch-port", type=int, default=8008, help="port of that page (default: 8008; 0 picks a free one)")


WATCH_GRACE_S = 1.2  # the watcher looks at the files every 0.5 s: its viewers get the last rows before it stops


@contextlib.contextmanager
def watching(args, path: str, again: str = ""):
    """With --watch: `gradlm watch PATH --wait` in a process of its own beside the work (reading the run there
    never takes the training's interpreter), its address printed before training starts; it stops when the
    work ends, after its viewers have had the last rows (why it stopped), or when this process dies. It runs in
    a session of its own, so Ctrl-C stops the training (which saves and says so) and not the page. Under
    torchrun only rank 0 starts it. again: what the user can run later to see the work again."""
    if not getattr(args, "watch", False) or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    import shlex
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "gradlm",
        "watch",
        str(path),
        "--wait",
        "--port",
        str(args.watch_port),
        "--exit-with-parent",
    ]
    # its errors go to our stderr
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()  # "watching NAME at http://127.0.0.1:PORT/", or nothing when it failed
        if not line.startswith("watching"):
            raise ConfigError(
                "--watch: the page could not start (see the line above); pick another --watch-port, or leave --watch "
                "out"
            )
        again = again or f"`gradlm watch {shlex.quote(str(path))}` shows it again"
        key = (
            " (with the API key of $GRADLM_API_KEY: add ?key=KEY to the address)"
            if os.environ.get("GRADLM_API_KEY")
            else ""
        )
        print(
            f"watch it live: {line.split()[-1]}{key} (the page stops with this command; {again})",
            file=sys.stderr,
            flush=True,
        )
        yield
        time.sleep(WATCH_GRACE_S)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


def cmd_watch(args) -> None:
    from gradlm.serving.watch import serve

    serve(
        args.runs,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("GRADLM_API_KEY", ""),
        wait=args.wait,
        exit_with_parent=args.exit_with_parent,
    )


def cmd_serve(args) -> None:
    from gradlm.serving.serve import serve

    key = args.api_key or os.environ.get("GRADLM_API_KEY", "")
    rt = model_runtime(args, serving=True)
    serve(
        args.run,
        host=args.host,
        port=args.port,
        api_key=key,
        best=args.best,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        threads=args.threads,
        runtime=rt,
    )


def cmd_eval(args) -> None:
    from gradlm.files import dumps
    from gradlm.evaluation.evaluate import EvalConfig, format_report, run_eval
    from gradlm.rundir import load_model

    cfg = pick(args, EvalConfig)
    cfg.validate()  # bad flags fail before the model loads
    rt = model_runtime(args)
    model, tok = load_model(args.run, best=args.best, device=rt.device, dtype=rt.dtype)
    report = run_eval(model, tok, cfg, runtime=rt)
    print(dumps({"run": args.run, **report}, indent=2) if args.json else format_report(report))


def cmd_landscape(args) -> None:
    from gradlm.evaluation.landscape import LandscapeConfig, landscape
    from gradlm.files import dumps

    cfg = pick(args, LandscapeConfig)
    cfg.validate()  # bad flags fail before the model loads
    text = None
    if args.data:
        path = Path(args.data)
        if not path.is_file():
            raise ConfigError(f"--data {args.data}: no such file; give a text file to score the surface on")
        text = path.read_text(encoding="utf-8", errors="replace")
    r = landscape(args.run, cfg, out=args.out or None, text=text, best=args.best, progress=args.progress)
    if args.json:
        print(dumps(r, indent=2))
        return
    where = args.out or str(Path(args.run) / "landscape")
    losses = [v for row in r["slice_2d"] for v in row] + r["slice_1d"]
    print(
        f"loss at the centre (the {r['weights']} weights): {r['center_loss']:.4f} on {r['windows']} batches; "
        f"curvature along d1: {r['curvature_d1']:.3g}; the slices span {min(losses):.4f} to {max(losses):.4f}"
    )
    if r["line"]:
        t = r["line_t"]
        start = r["line"][min(range(len(t)), key=lambda i: abs(t[i]))]
        print(f"the line from the initial weights: loss {start:.4f} there, {r['center_loss']:.4f} at the trained ones")
    if r["path"]:
        print(
            f"the path training recorded ({len(r['path']) - 2} snapshots), projected onto the plane: it holds "
            f"{r['path_explained']:.1%} of the path's variance"
        )
    print(f"wrote {where}/landscape.json and its pictures ({r['seconds']:.1f} s)")


def cmd_inspect(args) -> None:
    from gradlm.evaluation.inspection import format_views, inspect_text, neighbors
    from gradlm.files import check_output, dumps
    from gradlm.rundir import load_model

    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    if args.attention:
        check_output(args.attention, "--attention")
    model, tok = load_model(args.run, best=args.best)
    for name, value, count in (("--layer", args.layer, model.cfg.n_layer), ("--head", args.head, model.cfg.n_head)):
        if value is not None and not 0 <= value < count:
            what = "blocks" if name == "--layer" else "heads"
            raise ConfigError(f"{name} {value}: the model has {count} {what}, numbered 0 to {count - 1}")
    views = inspect_text(model, tok, args.text, k=args.top, lens=args.lens)
    if args.neighbors:
        views["neighbors"] = neighbors(model, tok, args.neighbors, k=args.top * 2)
    if args.attention:
        from gradlm.plots import plot_attention

        plot_attention(views["attention"], views["tokens"], args.attention, layer=args.layer, head=args.head)
    if args.json:
        print(dumps(views))
        return
    print(format_views(views))
    for row in views.get("neighbors", []):
        near = "  ".join(f"{n['text']} {n['cosine']:.2f}" for n in row["nearest"])
        print(f"\nnearest to {row['token']} in embedding space (cosine): {near}")
    if args.attention:
        print(f"\nwrote the attention maps to {args.attention}")


def _train_configs(args):
    from gradlm.model.transformer import ModelConfig
    from gradlm.training.config import TrainConfig

    (model_cfg, cfg), _ = given_configs(args, ModelConfig, TrainConfig)
    return model_cfg, cfg


def cmd_lr_find(args) -> None:
    from gradlm.training.lrfind import check_logged_out, lr_find

    model_cfg, cfg = _train_configs(args)
    check_logged_out(cfg, args.lr_out)  # not the temporary folder of --watch: the trackers' files would vanish with it
    with contextlib.ExitStack() as stack:
        out = args.lr_out
        if args.watch and not out:  # the page reads the sweep from a folder: a temporary one unless --out names one
            out = str(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gradlm-lr-find-"))) / "lr-find")
        stack.enter_context(watching(args, out, again="" if args.lr_out else "add --out DIR to keep the sweep"))
        # a kept sweep keeps its curve too
        png = args.png or (Path(args.lr_out) / "lr_find.png" if args.lr_out else None)
        r = lr_find(
            model_cfg,
            cfg,
            args.start_lr,
            args.end_lr,
            args.steps,
            png,
            log=lambda m: print(m, file=sys.stderr),
            out=out or None,
        )
    plot = f"plot: {r['png']}" if r.get("png") else "plot: none (add --png FILE to draw the curve)"
    print(f"suggested lr for {r['optimizer']}: {r['suggested_lr']:.3g}\nwhy: {r['reason']}\n{plot}")


def cmd_compare(args) -> None:
    from gradlm.training.compare import compare, format_table, parse_grid

    model_cfg, cfg = _train_configs(args)
    grid = parse_grid(
        {
            k: v
            for k, v in (
                ("optimizer", args.optimizers),
                ("batch", args.batches),
                ("lr", args.lrs),
                ("schedule", args.schedules),
            )
            if v
        }
    )
    for extra in args.vary or []:
        name, _, values = extra.partition("=")
        grid = [dict(g, **h) for g in grid for h in parse_grid({name.replace("-", "_"): values})]
    with watching(args, args.compare_out):
        r = compare(model_cfg, cfg, grid, args.compare_out, log=lambda m: print(m, file=sys.stderr))
    print(format_table(r["runs"]) + f"plot: {r['png']}")


def cmd_sweep(args) -> None:
    from gradlm.model.transformer import ModelConfig
    from gradlm.training.config import TrainConfig
    from gradlm.training.sweep import format_trials, parse_space, sweep

    (model_cfg, cfg), given = given_configs(args, ModelConfig, TrainConfig)
    space = parse_space(args.search)
    with watching(args, args.sweep_out):
        r = sweep(
            model_cfg,
            cfg,
            space,
            args.sweep_out,
            trials=args.trials,
            given=given,
            sampler=args.search_sampler,
            pruner=args.pruner,
            storage=args.storage,
            study_name=args.study,
            objective=args.objective,
            log=_stderr,
        )
    print(format_trials(r["trials"], r["objective"]), end="")
    b = r["best"]
    if b:
        settings = ", ".join(
            f"{k.replace('_', '-')}={v:.3g}" if isinstance(v, float) else f"{k.replace('_', '-')}={v}"
            for k, v in b["params"].items()
        )
        print(
            f"best: trial {b['trial']}, {r['objective'].replace('_', ' ')} {b[r['objective']]:.4f} ({settings}); "
            f"train with it: gradlm train --config {b['config']} --out runs/best"
        )
    if r["plots"]:
        print("plots: " + ", ".join(r["plots"]))


def cmd_plot(args) -> None:
    from gradlm.files import check_output
    from gradlm.plots import plot_runs
    from gradlm.rundir import RunDir, read_metrics

    first = RunDir(args.runs[0])
    out = check_output(args.png or first.training_plot, "--png")
    runs = {Path(r).name or str(r): read_metrics(r) for r in args.runs}
    # by default, the first run's plots/training.png
    print(plot_runs(runs, out) if args.png else first.write_training_plot(runs))


def cmd_export(args) -> None:
    if args.format == "gguf":
        from gradlm.formats.gguf import export_gguf

        if args.dtype is not None:
            raise ConfigError(
                "--dtype is the Hugging Face export's precision; a GGUF export takes --gguf-type f32, f16 or q8_0"
            )
        s = export_gguf(args.run, args.out_dir, args.gguf_type or "f16", best=args.best)
        print(
            f"{s['out']}: {s['architecture']} ({s['gguf_type']}), {s['params']:,} parameters ({s['bytes'] / 1e6:.1f} "
            "MB); "
            f"run it with llama.cpp: llama-server -m {s['out']}{' --jinja' if s['chat'] else ''}  (Ollama: ollama "
            f"create NAME -f {Path(s['out']).parent / 'Modelfile'})"
        )
        return
    from gradlm.formats.hf import export_hf

    if args.gguf_type is not None:
        raise ConfigError("--gguf-type applies to --format gguf")
    s = export_hf(args.run, args.out_dir, dtype=args.dtype or "float32", best=args.best)
    print(
        f"{s['out']}: {s['architecture']}, {s['params']:,} parameters in {s['dtype']} ({s['bytes'] / 1e6:.1f} MB); "
        "load it with transformers' AutoModelForCausalLM.from_pretrained"
    )


def cmd_import(args) -> None:
    from gradlm.formats.hf import import_hf

    s = import_hf(args.hf_dir, args.run, block_size=args.block_size)
    print(
        f"{s['run']}: imported {s['architecture']} ({s['params']:,} parameters, end of text {s['eos_token']}); "
        f"continue with `gradlm train --init {s['run']}` or `gradlm generate {s['run']}`"
    )


# ---- wiring ------------------------------------------------------------------------------------------


DATA_HELP = "text files, directories, .jsonl, .parquet, .gz/.zst of those, or registered names such as shakespeare"


def add_reading_flags(p: argparse.ArgumentParser) -> None:
    """How raw text is read, for the commands that read it outside a run (tokenizer train, prepare)."""
    from gradlm.text.prepare import READING

    for name, (default, text) in READING.items():
        p.add_argument(flag(name), default=default, help=text + f" (default: {default})")


LR_FIND_SKIP = (
    "out",
    "resume",
    "from_best",
    "pause_at",
    "init",
    "max_steps",
    "max_time",
    "max_tokens",
    "max_epochs",
    "patience",
    "min_delta",
    "schedule",
    "warmup_steps",
    "min_lr_ratio",
    "decay_fraction",
    "plots",
    "guard_retries",
    "eval_every",
    "eval_tokens",
    "log_every",
    "lr",
    "size",
    "sample_tokens",
    "sample_prompt",
    "snapshots",
)


def add_watch_command(t: argparse.ArgumentParser) -> None:
    t.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run directories, a `gradlm compare` output directory, or an `lr-find --out` directory",
    )
    t.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    t.add_argument("--port", type=int, default=8008, help="port to listen on (default: 8008; 0 picks a free one)")
    t.add_argument(
        "--api-key",
        default="",
        help="require this key (as 'Authorization: Bearer KEY' or the page's ?key=KEY) (default: $GRADLM_API_KEY, "
        "else none)",
    )
    t.add_argument(
        "--wait",
        action="store_true",
        help="accept a run directory that does not exist yet and show it once training starts",
    )
    # --watch's child: ends with its training
    t.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    t.set_defaults(func=cmd_watch)


def add_tokenizer_command(tk: argparse.ArgumentParser) -> None:
    from gradlm.text.tokenizer import DEFAULT_VOCAB, VOCAB_HELP

    tks = tk.add_subparsers(dest="action", required=True, parser_class=Parser)
    t = tks.add_parser("train", help="train a byte-level BPE tokenizer and save tokenizer.json")
    t.add_argument("--data", required=True, nargs="+", help=DATA_HELP)
    t.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB, help=VOCAB_HELP)
    t.add_argument(
        "--out", required=True, help="where to write the tokenizer: a .json file, or a directory (gets tokenizer.json)"
    )
    add_reading_flags(t)
    t.set_defaults(func=cmd_tokenizer_train)


def add_tokenize_command(t: argparse.ArgumentParser) -> None:
    t.add_argument("text", help="text to tokenize ('-' reads standard input)")
    t.add_argument("--tokenizer", default="", help="a run directory or tokenizer.json")
    t.add_argument("--ids", action="store_true", help="print only the ids")
    t.add_argument(
        "--allow-special",
        action="store_true",
        help="read <|endoftext|> etc. in the text as special tokens (default: plain text, as everywhere)",
    )
    t.add_argument(
        "--typos",
        type=int,
        default=0,
        metavar="N",
        help="also show N misspellings of the text (one typo each: drop, swap, double, near key) and how each splits",
    )
    t.add_argument("--seed", type=int, default=0, help="seed of the misspellings")
    t.set_defaults(func=cmd_tokenize)


def add_prepare_command(t: argparse.ArgumentParser) -> None:
    from gradlm.text.tokenizer import DEFAULT_VOCAB, VOCAB_HELP
    from gradlm.text.prepare import SHARD_TOKENS

    t.add_argument("--data", required=True, nargs="+", help=DATA_HELP)
    t.add_argument(
        "--out", required=True, help="output directory (new or empty; a prepare that was killed there resumes)"
    )
    t.add_argument(
        "--tokenizer",
        default="",
        help="tokenizer to use (default: train one with --vocab-size on a sample of the corpus)",
    )
    t.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB, help="when training a tokenizer: " + VOCAB_HELP)
    t.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out for validation")
    t.add_argument("--seed", type=int, default=0, help="seed of the document split")
    t.add_argument("--workers", type=int, default=0, help="tokenising processes (0 = one per core)")
    t.add_argument(
        "--shard-tokens", type=int, default=SHARD_TOKENS, help=f"token ids per shard file (default: {SHARD_TOKENS:,})"
    )
    add_reading_flags(t)
    t.set_defaults(func=cmd_prepare)


def add_train_command(t: argparse.ArgumentParser) -> None:
    from gradlm.training.config import TrainConfig
    from gradlm.model.transformer import ModelConfig

    add_fields(t, TrainConfig, typed_only=True)
    add_fields(t, ModelConfig, skip=("vocab_size",), typed_only=True)
    add_config_flags(t)
    watch_flags(t)
    t.set_defaults(func=cmd_train)


def add_finetune_command(t: argparse.ArgumentParser) -> None:
    from gradlm.training.config import TrainConfig
    from gradlm.training.finetune import FinetuneConfig
    from gradlm.model.transformer import ModelConfig

    t.add_argument("base", nargs="?", default="", help="run directory to start from (may be left out with --resume)")
    add_fields(t, FinetuneConfig, typed_only=True)
    add_fields(t, TrainConfig, skip=("init", "vocab_size"), typed_only=True)
    add_fields(
        t,
        ModelConfig,
        skip=tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "dropout"),
        typed_only=True,
    )
    watch_flags(t)
    t.set_defaults(func=cmd_finetune)


def add_merge_command(t: argparse.ArgumentParser) -> None:
    t.add_argument("run", help="a run fine-tuned with --method lora")
    t.add_argument("--out", required=True, help="run directory to create")
    t.add_argument("--best", action="store_true", help="merge best_adapter.safetensors (best validation loss)")
    add_runtime_flags(t, merge=True)
    t.set_defaults(func=cmd_merge)


def add_chat_command(t: argparse.ArgumentParser) -> None:
    from gradlm.generation.generate import SamplingConfig

    t.add_argument("run", help="run directory (fine-tuned for chat, e.g. with gradlm finetune)")
    t.add_argument(
        "--system",
        default="",
        help="system message that starts the conversation and is kept when old turns are dropped",
    )
    t.add_argument("--best", action="store_true", help="use the best checkpoint (best validation loss)")
    add_fields(t, SamplingConfig, skip=("stop",))
    constraint_flags(t)
    add_runtime_flags(t, decoding=True)
    t.set_defaults(func=cmd_chat)


def add_generate_command(t: argparse.ArgumentParser) -> None:
    from gradlm.generation.generate import SamplingConfig

    t.add_argument("run", help="run directory")
    t.add_argument(
        "prompt",
        nargs="*",
        help="text to continue; several prompts are decoded together (default: start of a document)",
    )
    t.add_argument(
        "--prompts", default="", help='file of prompts: one per line, or .jsonl of strings / {"prompt": ...}'
    )
    t.add_argument("--best", action="store_true", help="use best.safetensors (best validation loss)")
    t.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="stop when this text appears; it is not printed (repeat for several)",
    )
    t.add_argument(
        "--logprobs",
        type=int,
        default=0,
        metavar="N",
        help="show each token's probability and the N most likely alternatives",
    )
    t.add_argument(
        "--truncate",
        choices=("error", "left"),
        default="error",
        help="a prompt longer than the context window: error, or keep its last tokens (left)",
    )
    t.add_argument("--batch", type=int, default=8, help="prompts decoded together (default: 8)")
    t.add_argument(
        "--allow-special",
        action="store_true",
        help="read <|endoftext|>, <|user|> etc. in prompts as special tokens (default: plain text)",
    )
    add_fields(t, SamplingConfig, skip=("stop",))
    constraint_flags(t)
    add_runtime_flags(t, decoding=True)
    t.set_defaults(func=cmd_generate)


def add_serve_command(t: argparse.ArgumentParser) -> None:
    from gradlm.generation.engine import MAX_BATCH, MAX_QUEUE

    t.add_argument("run", help="run directory")
    t.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    t.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    t.add_argument(
        "--api-key",
        default="",
        help="require this key as 'Authorization: Bearer KEY' (default: $GRADLM_API_KEY, else none)",
    )
    t.add_argument("--best", action="store_true", help="serve best.safetensors (best validation loss)")
    t.add_argument(
        "--max-batch", type=int, default=MAX_BATCH, help=f"most sequences generated together (default: {MAX_BATCH})"
    )
    t.add_argument(
        "--max-queue", type=int, default=MAX_QUEUE, help=f"most requests waiting; more get 503 (default: {MAX_QUEUE})"
    )
    t.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for the model (default: all but one, left to the HTTP side)",
    )
    add_runtime_flags(t, decoding=True)
    t.set_defaults(func=cmd_serve)


def add_eval_command(t: argparse.ArgumentParser) -> None:
    from gradlm.evaluation.evaluate import EvalConfig

    t.add_argument("run", help="run directory")
    t.add_argument("--best", action="store_true", help="use best.safetensors (best validation loss)")
    t.add_argument("--json", action="store_true", help="print the results as JSON")
    add_fields(t, EvalConfig, skip=("qa",))
    qa_help = next(f for f in dataclasses.fields(EvalConfig) if f.name == "qa").metadata["help"]
    t.add_argument("--qa", nargs="+", default=[], metavar="FILE", help=qa_help)
    add_runtime_flags(t)
    t.set_defaults(func=cmd_eval)


def add_inspect_command(t: argparse.ArgumentParser) -> None:
    t.add_argument("run", help="run directory")
    t.add_argument("text", help="the text to look at (at most the model's context window)")
    t.add_argument("--best", action="store_true", help="use best.safetensors (best validation loss)")
    t.add_argument("--top", type=int, default=5, help="next-token candidates shown at each position")
    t.add_argument("--lens", action="store_true", help="also each layer's guess of the next token (the logit lens)")
    t.add_argument("--neighbors", default="", metavar="WORD", help="the nearest tokens to each token of WORD")
    t.add_argument("--attention", default="", metavar="PNG", help="draw the attention maps there")
    t.add_argument("--layer", type=int, default=None, help="--attention: only this layer (from 0)")
    t.add_argument("--head", type=int, default=None, help="--attention: only this head (from 0)")
    t.add_argument("--json", action="store_true", help="print every view as JSON (attention as numbers)")
    t.set_defaults(func=cmd_inspect)


def add_landscape_command(t: argparse.ArgumentParser) -> None:
    from gradlm.evaluation.landscape import LandscapeConfig

    t.add_argument("run", help="run directory")
    t.add_argument("--best", action="store_true", help="around best.safetensors (best validation loss)")
    t.add_argument(
        "--data", default="", metavar="FILE", help="score on this text (default: the run's validation windows)"
    )
    t.add_argument(
        "--out", default="", metavar="DIR", help="folder for landscape.json and the pictures (default: RUN/landscape)"
    )
    t.add_argument("--json", action="store_true", help="print the results as JSON")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_fields(t, LandscapeConfig)
    t.set_defaults(func=cmd_landscape)


def add_lr_find_command(t: argparse.ArgumentParser) -> None:
    from gradlm.training.config import TrainConfig
    from gradlm.model.transformer import ModelConfig

    t.add_argument("--start-lr", type=float, default=1e-6, help="first learning rate of the sweep")
    t.add_argument("--end-lr", type=float, default=10.0, help="last learning rate of the sweep")
    t.add_argument("--steps", type=int, default=100, help="steps of the sweep")
    t.add_argument(
        "--png", default="", help="where to write the plot of loss against learning rate (checked before the sweep)"
    )
    t.add_argument(
        "--out",
        dest="lr_out",
        default="",
        help="folder to record the sweep in as it runs: lr_find.jsonl, then lr_find.json and lr_find.png (what "
        "`gradlm watch` shows)",
    )
    watch_flags(t)
    # The sweep sets the learning rate itself, runs a fixed number of steps and writes no run: flags about
    # budgets, schedules, evaluation, stopping and run directories mean nothing here and are not offered.
    add_fields(t, TrainConfig, skip=LR_FIND_SKIP, typed_only=True)
    add_fields(t, ModelConfig, skip=("vocab_size",), typed_only=True)
    add_config_flags(t)
    t.set_defaults(func=cmd_lr_find)


def add_compare_command(t: argparse.ArgumentParser) -> None:
    from gradlm.training.config import TrainConfig
    from gradlm.model.transformer import ModelConfig

    t.add_argument(
        "--optimizer",
        dest="optimizers",
        default="",
        metavar="A,B,...",
        help="optimizers to compare, comma-separated, e.g. sgd,momentum,adamw,muon",
    )
    t.add_argument(
        "--batch",
        dest="batches",
        default="",
        metavar="A,B,...",
        help="batch modes to compare, comma-separated, e.g. full,1,32",
    )
    t.add_argument(
        "--lr",
        dest="lrs",
        default="",
        metavar="A,B,...",
        help="learning rates to compare, comma-separated (default: each optimizer's own)",
    )
    t.add_argument(
        "--schedule", dest="schedules", default="", metavar="A,B,...", help="schedules to compare, comma-separated"
    )
    t.add_argument(
        "--vary",
        action="append",
        metavar="FIELD=V1,V2",
        help="any other training setting to compare, e.g. --vary weight-decay=0,0.1",
    )
    t.add_argument(
        "--out", dest="compare_out", required=True, help="folder for the runs, compare.png, compare.md and compare.json"
    )
    add_fields(
        t,
        TrainConfig,
        skip=("out", "optimizer", "batch", "lr", "schedule", "resume", "from_best", "pause_at", "size"),
        typed_only=True,
    )
    add_fields(t, ModelConfig, skip=("vocab_size",), typed_only=True)
    add_config_flags(t)
    watch_flags(t)
    t.set_defaults(func=cmd_compare)


def add_sweep_command(t: argparse.ArgumentParser) -> None:
    from gradlm.training.config import TrainConfig
    from gradlm.model.transformer import ModelConfig

    sweep_search_flags(t)
    sweep_study_flags(t)
    add_fields(t, TrainConfig, skip=("out", "resume", "from_best", "pause_at"), typed_only=True)
    add_fields(t, ModelConfig, skip=("vocab_size",), typed_only=True)
    add_config_flags(t)
    watch_flags(t)
    t.set_defaults(func=cmd_sweep)


def sweep_search_flags(p: argparse.ArgumentParser) -> None:
    """What `gradlm sweep` searches and how: the space, the trials, the sampler, the pruner, the objective."""
    from gradlm.training.sweep import OBJECTIVES, PRUNERS, SAMPLERS

    p.add_argument(
        "--search",
        nargs="+",
        required=True,
        metavar="NAME=SPEC",
        help="the search space: any training or model setting, as a list (optimizer=adamw,muon), a range "
        "(dropout=0..0.2), "
        "a log range (lr=1e-4..3e-2:log) or a stepped range (d-model=128..384:64); every other flag is the same for "
        "every trial",
    )
    p.add_argument(
        "--trials",
        type=int,
        default=20,
        help="finished trials the study should hold; running the command again continues it (default: 20)",
    )
    p.add_argument(
        "--search-sampler",
        choices=SAMPLERS,
        default="tpe",
        help="how Optuna proposes settings (not --sampler, the order of the training windows): tpe (learns from the "
        "trials so far), random, or grid (every combination of lists and stepped ranges) (default: tpe)",
    )
    p.add_argument(
        "--pruner",
        choices=PRUNERS,
        default="median",
        help="stop trials behind the others at the same share of the budget: median, hyperband, or none (default: "
        "median)",
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="val_bpb",
        help="what the search minimises: the final validation bits per byte (fair across vocabularies) or loss "
        "(default: val_bpb)",
    )


def sweep_study_flags(p: argparse.ArgumentParser) -> None:
    """Where `gradlm sweep` keeps its study and trials."""
    p.add_argument(
        "--storage",
        default="",
        metavar="URL",
        help="the Optuna storage of the study (default: sqlite:///OUT/study.db); a PostgreSQL URL lets several "
        "machines work on one study",
    )
    p.add_argument(
        "--study", default="", metavar="NAME", help="the study's name in the storage (default: the --out folder's name)"
    )
    p.add_argument(
        "--out",
        dest="sweep_out",
        required=True,
        help="folder for the trials (trial-NNNN run directories), the study, trials.md, best_config.json and the plots",
    )


def add_plot_command(t: argparse.ArgumentParser) -> None:
    t.add_argument("runs", nargs="+", help="run directories")
    t.add_argument("--png", default="", help="output file (default: RUN/plots/training.png)")
    t.set_defaults(func=cmd_plot)


def add_export_command(t: argparse.ArgumentParser) -> None:
    t.add_argument("run", help="run directory")
    t.add_argument("out_dir", help="output directory (new, empty, or a previous export of the same format)")
    t.add_argument(
        "--format",
        choices=("hf", "gguf"),
        default="hf",
        help="hf: transformers' layout (config.json, model.safetensors, tokenizer files); gguf: OUT/model.gguf for "
        "llama.cpp, Ollama and LM Studio, and an Ollama Modelfile (default: hf)",
    )
    t.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="--format hf: weight precision (default: float32)",
    )
    t.add_argument(
        "--gguf-type",
        choices=("f32", "f16", "q8_0"),
        default=None,
        help="--format gguf: f32 (exact), f16 (half the size) or q8_0 (a quarter; 32 weights share a scale) (default: "
        "f16)",
    )
    t.add_argument("--best", action="store_true", help="export best.safetensors (best validation loss)")
    t.set_defaults(func=cmd_export)


def add_import_command(t: argparse.ArgumentParser) -> None:
    t.add_argument("hf_dir", help="folder with config.json, model.safetensors and tokenizer.json")
    t.add_argument("run", help="run directory to create")
    t.add_argument(
        "--block-size", type=int, default=0, help="context window (default: the checkpoint's max_position_embeddings)"
    )
    t.set_defaults(func=cmd_import)


# in the order `gradlm --help` lists them: each command's one line, and the function that adds its flags
COMMANDS = {
    "tokenizer": ("tokenizer tools", add_tokenizer_command),
    "tokenize": ("show how text splits into tokens", add_tokenize_command),
    "prepare": ("tokenise a corpus into train/val token files", add_prepare_command),
    "train": ("train a model by gradient descent", add_train_command),
    "finetune": (
        "fine-tune a run on chat .jsonl (loss on the replies) or raw text: full, frozen layers or LoRA",
        add_finetune_command,
    ),
    "merge": ("fold a LoRA run's adapter into its base weights: a run of full weights", add_merge_command),
    "chat": ("talk with a run in the terminal (multi-turn, streamed; /reset, /quit)", add_chat_command),
    "generate": ("write text with a trained model (streamed)", add_generate_command),
    "serve": ("serve a run over HTTP: OpenAI-compatible API and a playground page", add_serve_command),
    "watch": (
        "a live page of one or more runs: curves, events, samples, progress (a compare or lr-find directory too)",
        add_watch_command,
    ),
    "eval": (
        "loss, perplexity, bits per byte/char of a text; typo robustness; multiple choice; QA exact match",
        add_eval_command,
    ),
    "inspect": (
        "inside a model: attention maps, next-token candidates, the logit lens, embedding neighbours",
        add_inspect_command,
    ),
    "landscape": (
        "the loss surface around a run's weights: 1-D and 2-D slices, the line from its initial weights",
        add_landscape_command,
    ),
    "lr-find": ("learning-rate range test: plot loss vs an exponentially growing lr, suggest one", add_lr_find_command),
    "compare": ("train several configurations under one budget and plot them together", add_compare_command),
    "sweep": (
        "search hyperparameters with Optuna: every trial a run under one budget; the best settings, which mattered, "
        "plots",
        add_sweep_command,
    ),
    "plot": ("draw loss, learning-rate and gradient-norm curves of one or more runs", add_plot_command),
    "export": (
        "write a run as a Hugging Face transformers checkpoint (Llama / Qwen3) or a llama.cpp GGUF file",
        add_export_command,
    ),
    "import": ("turn a local Hugging Face Llama/Qwen3/Qwen2 checkpoint into a run directory", add_import_command),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser, with its flags (command None: what the docs' tests read). main() builds less: given
    a command's name, that command's parser alone, which imports only what its flags need (the tokenizer's
    commands, `prepare` and `watch` never load torch); given anything else (nothing, --help, a misspelt name),
    every command listed with its one line and no flags, which is all that `gradlm --help` and the message need."""
    p = Parser(prog="gradlm", description="Train small GPT-style language models from your own text.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (text, add) in COMMANDS.items():
        flags = command is None or command == name
        if flags or command not in COMMANDS:
            t = sub.add_parser(name, help=text)
            if flags:
                add(t)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = argv[0] if argv else ""
    # a flag before the command (not --help) is an error the whole parser words as it always did
    parser = build_parser(None if first.startswith("-") and first not in ("-h", "--help") else first)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except GradlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # the machine refused a read or write the checks before the work could not foresee
        where = f" {e.filename}" if e.filename else ""
        print(
            f"error: cannot access{where}: {e.strerror or e}; check the path, its permissions and the free disk space",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
