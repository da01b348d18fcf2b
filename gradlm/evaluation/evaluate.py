"""Evaluation: how well a model predicts text, how much typos hurt it, multiple-choice accuracy and
question-answering exact match (greedy replies through the chat template).

Whole-file scoring slides a window of the model's context over the text. The first window scores
every token it holds; each later window moves `stride` tokens on and scores only its newest `stride`
tokens, so every token is scored exactly once, with at least (context - stride) tokens of left
context (stride 1: always the full window; stride = context: non-overlapping windows, cheapest).
The windows go through the one scorer (gradlm/model/scoring.py) in float32, the reference precision.

    loss            mean cross-entropy per token, in nats
    perplexity      exp(loss): the model is as unsure as a uniform choice among this many tokens
    bits per byte   total bits / UTF-8 bytes of the text: independent of the tokenizer, so models with
                    different vocabularies compare fairly (8 = knowing nothing about bytes)
    bits per char   total bits / characters

Each document is preceded by <|endoftext|> (as in training), so the first token is scored too; the
end-of-text tokens between documents count in the loss but cover no bytes or characters.

    >>> from gradlm.generation.generate import load
    >>> lm = load("runs/demo")
    >>> evaluate_text(lm.model, lm.tok, open("notes.txt").read()).bits_per_byte
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gradlm.text.corpus import jsonl_objects
from gradlm.errors import ConfigError, DataError, check_field_types
from gradlm.model.compiling import use_cache
from gradlm.model.transformer import Transformer
from gradlm.model.scoring import score, sliding_windows, window_plan
from gradlm.text.tokenizer import Tokenizer
from gradlm.text.typos import inject_typos


@dataclass
class EvalConfig:
    """What `gradlm eval` measures."""

    data: str = field(
        default="",
        metadata={"help": "text to score, all of it: a file, directory, .jsonl, .gz or a registered dataset name"},
    )
    stride: int = field(
        default=0,
        metadata={
            "help": "tokens each window moves on (and scores); 0 = half the context window. Smaller = more context "
            "per token, slower"
        },
    )
    batch: int = field(default=8, metadata={"help": "windows (or answer choices) per forward pass"})
    typos: float = field(
        default=0.0,
        metadata={
            "help": "also score a copy of the text with typos in this share of its letters (swap, drop, insert, "
            "substitute), e.g. 0.05"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the typos"})
    choices: str = field(
        default="",
        metadata={"help": 'multiple-choice items to score: .jsonl with {"context", "choices", "answer"} per line'},
    )
    qa: list[str] = field(
        default_factory=list,
        metadata={
            "help": "question-answering files to score by exact match of greedy chat replies: .jsonl whose last "
            'message is the expected answer (see gradlm/text/sft.py); accuracy per file or per "split" field'
        },
    )
    answers: str = field(
        default="free",
        metadata={
            "help": "QA replies: free, or choices (the model picks among the distinct answers the QA files hold; the "
            "report shows exact match both ways)"
        },
    )
    qa_max_tokens: int = field(
        default=32, metadata={"help": "most tokens of a QA reply (generation stops earlier at <|end|>)"}
    )
    text_field: str = field(default="text", metadata={"help": "field holding the text in .jsonl input"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar on a terminal"})

    def __post_init__(self):
        if isinstance(self.qa, str):
            self.qa = [self.qa]
        check_field_types(self)

    def validate(self, block_size: int | None = None) -> None:
        problems = []
        if not self.data and not self.choices and not self.qa:
            problems.append("nothing to evaluate: give --data FILE (text), --choices FILE.jsonl and/or --qa FILE.jsonl")
        if self.answers not in ("free", "choices"):
            problems.append(f"--answers must be free or choices, got {self.answers!r}")
        elif self.answers == "choices" and not self.qa:
            problems.append("--answers choices needs --qa FILE.jsonl")
        if self.qa_max_tokens < 1:
            problems.append(f"--qa-max-tokens must be at least 1, got {self.qa_max_tokens}")
        if not (0 <= self.typos <= 1):
            problems.append(f"--typos is the share of letters to change and must be in [0, 1], got {self.typos}")
        elif self.typos and not self.data:
            problems.append("--typos needs --data: it scores a noisy copy of that text")
        if self.stride < 0:
            problems.append(f"--stride must not be negative, got {self.stride}")
        elif block_size is not None and self.stride > block_size:
            problems.append(f"--stride ({self.stride}) must be at most the context window ({block_size})")
        if self.batch < 1:
            problems.append(f"--batch must be at least 1, got {self.batch}")
        if problems:
            raise ConfigError("invalid evaluation settings: " + "; ".join(problems))


# ---- progress -------------------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar on a terminal; otherwise a plain log line at most every 10 s (with rate and ETA), and a
    closing line at 100% once any line was shown, so the log never ends at 97%."""

    def __init__(self, total: int, enabled: bool, what: str):
        self.total, self.enabled, self.what, self.done = total, enabled, what, 0
        self.bar = (
            tqdm(total=total, unit=what, desc="eval", dynamic_ncols=True) if enabled and sys.stderr.isatty() else None
        )
        self.t0 = self.last = time.time()
        self.shown = False

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.done < self.total and time.time() - self.last >= 10:
            self.last = time.time()
            rate = self.done / max(self.last - self.t0, 1e-9)
            print(
                f"eval: {self.done / self.total:.0%} ({self.done:,}/{self.total:,} {self.what}s, {rate:.1f}/s, ETA "
                f"{(self.total - self.done) / rate:.0f}s)",
                file=sys.stderr,
            )
            self.shown = True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.shown and self.done >= self.total:
            print(
                f"eval: 100% ({self.done:,}/{self.total:,} {self.what}s in {time.time() - self.t0:.0f}s)",
                file=sys.stderr,
            )


# ---- scoring text -----------------------------------------------------------------------------------------


@dataclass
class TextScore:
    loss: float  # mean cross-entropy per token (nats)
    perplexity: float
    bits_per_byte: float
    bits_per_char: float
    tokens: int  # tokens scored
    bytes: int
    chars: int
    windows: int
    stride: int
    nll: torch.Tensor | None = field(default=None, repr=False, compare=False)  # per scored token, with keep_nll

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "nll"}


def evaluate_text(
    model: Transformer,
    tok: Tokenizer,
    text: str | list[str],
    stride: int = 0,
    batch: int = 8,
    progress: bool = False,
    keep_nll: bool = False,
) -> TextScore:
    """Loss, perplexity, bits per byte and bits per character of a text (or several documents); keep_nll
    keeps each token's loss too (.nll, for the per-word view of typos)."""
    docs = [text] if isinstance(text, str) else list(text)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tok.vocab_size} ids but the model only {model.cfg.vocab_size}; use the run's own "
            "tokenizer"
        )
    window = model.cfg.block_size
    stride = stride or max(1, window // 2)
    if not 1 <= stride <= window:
        raise ConfigError(f"stride must be between 1 and the context window ({window}), got {stride}")
    eot = tok.eot_id
    seq: list[int] = []
    for d in docs:
        seq += ([eot] if eot >= 0 else []) + tok.encode(d)
    chars = sum(len(d) for d in docs)
    if eot < 0 and seq:  # nothing to predict the very first token from: it is not scored
        chars -= len(tok.decode(seq[:1]))
    if len(seq) < 2:
        raise DataError("the text is too short to evaluate: it needs at least one token to predict")
    plan = window_plan(len(seq) - 1, window, stride)
    bar = _Progress(len(plan), progress, "window")
    # float32: the reference figure (training's validation uses the run's compute dtype; see gradlm/model/scoring.py)
    try:
        s = score(
            model,
            sliding_windows(torch.tensor(seq), window, stride, batch),
            torch.tensor(tok.token_byte_lengths()),
            "float32",
            keep=keep_nll,
            on_window=bar.update,
        )
    finally:
        bar.close()
    bits, total_bytes, loss = s.bits, s.bytes, s.loss
    return TextScore(
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        bits_per_byte=bits / total_bytes if total_bytes else float("nan"),
        bits_per_char=bits / chars if chars > 0 else float("nan"),
        tokens=s.tokens,
        bytes=total_bytes,
        chars=chars,
        windows=len(plan),
        stride=stride,
        nll=s.per_token,
    )


# ---- multiple choice ---------------------------------------------------------------------------------------


@dataclass
class ChoiceItem:
    context: str
    choices: list[str]
    answer: int


def load_choices(path: str | Path) -> list[ChoiceItem]:
    """Items from a .jsonl file: {"context": str, "choices": [str, ...], "answer": index or choice text}."""
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f'no choices file at {p}; give a .jsonl with one {{"context", "choices", "answer"}} object per line'
        )
    items = []
    for n, obj in jsonl_objects(p):
        where = f"{p} line {n}"
        if not isinstance(obj, dict) or not isinstance(obj.get("context"), str):
            raise DataError(f'{where} needs a string field "context"')
        choices = obj.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f'{where} needs "choices": a list of at least two non-empty strings')
        answer = obj.get("answer")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(
                f'{where}: "answer" must be the index (0..{len(choices) - 1}) or the text of the right choice, got '
                f"{answer!r}"
            )
        items.append(ChoiceItem(obj["context"], choices, answer))
    if not items:
        raise DataError(f"{p} holds no items")
    return items


@dataclass
class ChoiceScore:
    items: int
    correct: int  # by total log-likelihood of the choice
    correct_norm: int  # by log-likelihood per byte of the choice (does not favour short answers)
    accuracy: float
    accuracy_norm: float
    predictions: list[dict]  # per item: logprobs of each choice, picked, picked_norm, answer

    def to_dict(self) -> dict:
        return asdict(self)


def _split_context(context: str, choice: str) -> tuple[str, str]:
    # Trailing spaces of the context belong to the answer: tokens carry their leading space (" Paris"),
    # so "is" + " Paris" tokenises the way the model saw such text in training.
    stripped = context.rstrip(" ")
    return stripped, context[len(stripped) :] + choice


@torch.inference_mode()
def score_choices(
    model: Transformer, tok: Tokenizer, items: list[ChoiceItem], batch: int = 8, progress: bool = False
) -> ChoiceScore:
    """Pick each item's choice by log-likelihood given the context (plain and per byte); accuracy."""
    block, eot = model.cfg.block_size, tok.eot_id
    pairs = []  # (item, choice, input ids, targets, bytes of the choice)
    for n, item in enumerate(items):
        for c, choice in enumerate(item.choices):
            ctx, cont = _split_context(item.context, choice)
            ctx_ids = ([eot] if eot >= 0 else []) + tok.encode(ctx)
            cont_ids = tok.encode(cont)
            if not ctx_ids:
                raise DataError(
                    f"item {n + 1} has an empty context and the tokenizer has no <|endoftext|> to start from"
                )
            if len(cont_ids) > block:
                raise DataError(
                    f"item {n + 1} choice {c + 1} is {len(cont_ids)} tokens, longer than the context window ({block})"
                )
            seq = (ctx_ids + cont_ids)[-(block + 1) :]  # a long context loses its oldest tokens
            targets = [-1] * (len(seq) - 1 - len(cont_ids)) + cont_ids
            pairs.append((n, c, seq[:-1], targets, len(cont.encode())))
    device = model.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    logprobs = [[0.0] * len(it.choices) for it in items]
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][2]))  # similar lengths share a batch
    bar = _Progress(len(pairs), progress, "choice")
    try:
        for i in range(0, len(order), batch):
            group = [pairs[k] for k in order[i : i + batch]]
            T = max(len(p[2]) for p in group)
            x = torch.zeros(len(group), T, dtype=torch.long)
            y = torch.full((len(group), T), -1, dtype=torch.long)
            for row, (_, _, ids, targets, _) in enumerate(group):
                x[row, : len(ids)] = torch.tensor(ids)
                y[row, : len(targets)] = torch.tensor(targets)
            nll = model(x.to(device), y.to(device), reduction="none").double().sum(-1).cpu()  # (B,)
            for row, (n, c, _, _, _) in enumerate(group):
                logprobs[n][c] = -float(nll[row])
            bar.update(len(group))
    finally:
        bar.close()
        model.train(was_training)
    nbytes = {(n, c): b for n, c, _, _, b in pairs}
    preds = []
    correct = correct_norm = 0
    for n, item in enumerate(items):
        lp = logprobs[n]
        norm = [lp[c] / max(nbytes[(n, c)], 1) for c in range(len(lp))]
        pick, pick_norm = max(range(len(lp)), key=lp.__getitem__), max(range(len(lp)), key=norm.__getitem__)
        correct += pick == item.answer
        correct_norm += pick_norm == item.answer
        preds.append(
            {"logprobs": lp, "logprobs_per_byte": norm, "picked": pick, "picked_norm": pick_norm, "answer": item.answer}
        )
    return ChoiceScore(len(items), correct, correct_norm, correct / len(items), correct_norm / len(items), preds)


# ---- question answering ----------------------------------------------------------------------------------


@dataclass
class QAItem:
    messages: list[dict]  # the conversation up to the question (the model writes the next reply)
    answer: str
    split: str
    where: str


def load_qa(paths: list[str] | str) -> list[QAItem]:
    """QA items from .jsonl chat files (gradlm/text/sft.py formats): the last message, the assistant's, is the
    expected answer. The split is the line's "split" field, else the file's name without .jsonl."""
    from gradlm.text.sft import read_conversations

    items = []
    for path in [paths] if isinstance(paths, str) else paths:
        default_split = Path(Path(path).name.removesuffix(".gz")).stem  # heldout.jsonl -> heldout
        for c in read_conversations(path):
            *question, last = c.messages
            if last["role"] != "assistant" or not question:
                raise DataError(
                    f"{c.where}: a QA line must end with the assistant's expected answer, after the question"
                )
            split = c.extra.get("split", default_split)
            if not isinstance(split, str) or not split:
                raise DataError(f'{c.where}: "split" must be a non-empty string, got {split!r}')
            items.append(QAItem(question, last["content"], split, c.where))
    return items


def qa_answers(items: list[QAItem]) -> list[str]:
    """The distinct expected answers of QA items, in order of first appearance (what --answers choices allows)."""
    return list(dict.fromkeys(it.answer for it in items))


def normalize_answer(text: str) -> str:
    """What exact match compares: case folded, runs of whitespace as one space, no space at the ends."""
    return " ".join(text.split()).casefold()


@dataclass
class QAScore:
    items: int
    correct: int
    accuracy: float
    splits: dict[str, dict]  # per split: items, correct, accuracy
    predictions: list[dict]  # per item: where, split, expected, got, correct

    def to_dict(self) -> dict:
        return asdict(self)


def score_qa(
    model: Transformer,
    tok: Tokenizer,
    items: list[QAItem],
    batch: int = 8,
    max_new_tokens: int = 32,
    progress: bool = False,
    runtime=None,
    choices: list[str] | None = None,
) -> QAScore:
    """Greedy replies through the chat template, stopped at <|end|>, scored by exact match (normalize_answer).
    The questions are rows of the engine, batch at a time (a finished row makes room for the next). With
    choices, every reply is constrained to be one of them (gradlm/generation/constrain.py)."""
    from gradlm.text.chat import encode_chat, stop_ids
    from gradlm.generation.constrain import make_constraint
    from gradlm.generation.engine import Engine, Request
    from gradlm.model.sampling import SamplingConfig

    if not items:
        raise DataError("no QA items to score")
    block, stops = model.cfg.block_size, frozenset(stop_ids(tok))
    prompts = [encode_chat(tok, it.messages) for it in items]
    for it, p in zip(items, prompts):
        if len(p) > block:
            raise DataError(f"{it.where}: the question is {len(p)} tokens, more than the context window ({block})")
    sampling = SamplingConfig(temperature=0, max_new_tokens=max_new_tokens)
    engine = Engine(model, tok, max_batch=batch, max_queue=len(items), runtime=runtime)
    replies: list[str] = [""] * len(items)
    bar = _Progress(len(items), progress, "question")
    try:
        constraint = make_constraint(choices=choices) if choices else None
        for i, piece in engine.stream(
            [Request(p, sampling, 1, stops, slide=True, constraint=constraint) for p in prompts]
        ):
            replies[i] += piece.text
            if piece.finish:
                bar.update(1)
    finally:
        bar.close()
    predictions, splits = [], {}
    for it, got in zip(items, replies):
        ok = normalize_answer(got) == normalize_answer(it.answer)
        predictions.append({"where": it.where, "split": it.split, "expected": it.answer, "got": got, "correct": ok})
        s = splits.setdefault(it.split, {"items": 0, "correct": 0})
        s["items"] += 1
        s["correct"] += ok
    for s in splits.values():
        s["accuracy"] = s["correct"] / s["items"]
    correct = sum(p["correct"] for p in predictions)
    return QAScore(len(items), correct, correct / len(items), splits, predictions)


# ---- the command --------------------------------------------------------------------------------------------


def run_eval(model: Transformer, tok: Tokenizer, cfg: EvalConfig, runtime=None) -> dict:
    """Everything `gradlm eval` reports, as a JSON-ready dict. runtime (gradlm/runtime.py): the device and
    weights' dtype the model was loaded in, and whether to compile what is scored (QA decodes on the engine)."""
    cfg.validate(model.cfg.block_size)
    compiling = runtime is not None and runtime.compile
    if compiling:
        use_cache()  # inductor's compiled graphs kept in $GRADLM_CACHE/inductor
    scored = torch.compile(model) if compiling else model
    param = next(model.parameters())
    report: dict = {"device": str(param.device), "dtype": str(param.dtype).removeprefix("torch.")}
    if cfg.data:
        from gradlm.text.corpus import read_documents

        docs = [d.text for d in read_documents(cfg.data, cfg.text_field)]
        clean = evaluate_text(scored, tok, docs, cfg.stride, cfg.batch, cfg.progress, keep_nll=bool(cfg.typos))
        report["data"] = cfg.data
        report["clean"] = clean.to_dict()
        if cfg.typos:
            noisy_docs, edits, letters = [], 0, 0
            for k, d in enumerate(docs):
                t = inject_typos(d, cfg.typos, cfg.seed + k)
                noisy_docs.append(t.text)
                edits, letters = edits + t.edits, letters + t.letters
            noisy = evaluate_text(scored, tok, noisy_docs, cfg.stride, cfg.batch, cfg.progress, keep_nll=True)
            from gradlm.evaluation.robustness import word_penalties

            report["typos"] = {
                "rate": cfg.typos,
                "seed": cfg.seed,
                "edits": edits,
                "letters": letters,
                "noisy": noisy.to_dict(),
                "penalty_bits_per_byte": noisy.bits_per_byte - clean.bits_per_byte,
                "words": word_penalties(tok, docs, noisy_docs, clean.nll, noisy.nll),
            }
    if cfg.choices:
        report["choices_file"] = cfg.choices
        report["choices"] = score_choices(scored, tok, load_choices(cfg.choices), cfg.batch, cfg.progress).to_dict()
    if cfg.qa:
        report["qa_files"] = list(cfg.qa)
        items = load_qa(cfg.qa)
        report["qa"] = score_qa(model, tok, items, cfg.batch, cfg.qa_max_tokens, cfg.progress, runtime).to_dict()
        if cfg.answers == "choices":
            answers = qa_answers(items)
            report["qa_choices"] = {
                "answers": answers,
                **score_qa(model, tok, items, cfg.batch, cfg.qa_max_tokens, cfg.progress, runtime, answers).to_dict(),
            }
    return report


def format_report(report: dict) -> str:
    """The human-readable summary `gradlm eval` prints."""
    lines = []
    if "clean" in report:
        c = report["clean"]
        lines.append(
            f"{report['data']}: {c['tokens']:,} tokens, {c['bytes']:,} bytes, {c['chars']:,} characters "
            f"({c['windows']:,} windows, stride {c['stride']})"
        )
        lines.append(
            f"loss {c['loss']:.4f} | perplexity {c['perplexity']:.2f} | bits per byte {c['bits_per_byte']:.4f} | bits "
            f"per char {c['bits_per_char']:.4f}"
        )
    if "typos" in report:
        t = report["typos"]
        clean, noisy, pen = report["clean"]["bits_per_byte"], t["noisy"]["bits_per_byte"], t["penalty_bits_per_byte"]
        lines.append(
            f"with typos (rate {t['rate']:g}, seed {t['seed']}: {t['edits']:,} typos in {t['letters']:,} letters): "
            f"bits per byte {noisy:.4f} vs clean {clean:.4f}, penalty {pen:+.4f} ({pen / clean:+.1%})"
        )
        if "words" in t:
            from gradlm.evaluation.robustness import format_word_penalties

            lines.append(format_word_penalties(t["words"]))
    if "choices" in report:
        s = report["choices"]
        lines.append(
            f"{report['choices_file']}: {s['items']} items | accuracy {s['accuracy']:.3f} "
            f"({s['correct']}/{s['items']}) | "
            f"length-normalised {s['accuracy_norm']:.3f} ({s['correct_norm']}/{s['items']})"
        )
    if "qa" in report:
        q = report["qa"]
        c = report.get("qa_choices")
        lines.append(f"QA exact match ({', '.join(report['qa_files'])}):")
        if c:
            lines.append(f"  {'split':<12} {'free':<17} choices ({len(c['answers'])} answers)")
        rows = [(name, s, c["splits"][name] if c else None) for name, s in q["splits"].items()] + [("all", q, c)]
        for name, s, cs in rows:
            free = f"{s['accuracy']:.3f} ({s['correct']}/{s['items']})"
            both = f"  {cs['accuracy']:.3f} ({cs['correct']}/{cs['items']})" if cs else ""
            lines.append(f"  {name:<12} {free:<17}{both}".rstrip())
    return "\n".join(lines)
