"""prepare(): a corpus -> token shards + meta.json, streamed, in memory bounded by the workers and the chunk.

    OUT/
      train-00000.bin ...   token ids (uint16 when the vocabulary fits, else uint32), each document preceded
      val-00000.bin ...     by <|endoftext|>; at most `shard_tokens` ids a shard, each written atomically
      tokenizer.json        the tokenizer that produced them
      meta.json             format 2: per split its shards (tokens, sha256), documents and bytes; the
                            tokenizer's sha256, dtype, split rule, sources (written last: marks a complete folder)
      progress.json         while preparing: the shards done and where the stream stands (a killed prepare
                            resumes from it and writes the same shards as an uninterrupted one)

The pipeline: documents are read one at a time (gradlm/text/corpus.py); each goes to train or validation (below);
its text is cut into pieces of ~CHUNK_CHARS at pre-token boundaries, so pieces encode to exactly the ids of
the whole; worker processes encode the pieces (tiktoken's fast path) with a bounded number in flight, and the
ids are appended to the split's current shard, which is flushed when full.

The validation split, decided without holding the corpus:
- whole text files are chosen from their sizes on disk before any is read (a seeded choice of files making
  up about val_fraction of the bytes, skipping one that would overshoot by half); when no such choice exists
  (one file, or a few large ones) each file gives its last val_fraction of bytes instead, cut after a line break;
- records (.jsonl lines, Parquet rows) are chosen one by one by a seeded hash of where they are.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import re
import signal
import sys
import time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gradlm import files as ckpt
from gradlm.text.corpus import (
    DEFAULT_ERRORS,
    ReadStats,
    StreamedDocument,
    decompressed_size,
    iter_documents,
    kind,
    source_files,
)
from gradlm.errors import ConfigError, DataError
from gradlm.text.tokenizer import Tokenizer

CHUNK_CHARS = 1 << 20  # tokenise in ~1 MB pieces, in parallel
SHARD_TOKENS = 1 << 26  # ids per shard: 64M (128 MB as uint16)
SAMPLE_PIECE = 8 << 10  # the tokenizer's sample is drawn in pieces of this many characters
TOKENIZER_SAMPLE = 64 << 20  # bytes of text a tokenizer learns from by default: memory stays ~2 GB whatever the corpus
FORMAT = 2
SPLITS = ("train", "val")
# How raw text is read, with each setting's default and help: the flags of `tokenizer train` and `prepare`, and
# fields of a run's TrainConfig (one source for both, so the commands that never train need not load the trainer)
READING = {
    "text_field": ("text", "field (or Parquet column) holding the text in .jsonl and .parquet input"),
    "encoding_errors": (
        "replace",
        "bytes that are not UTF-8 in raw text: replace (by U+FFFD, counted), skip (the document, counted) "
        "or strict (stop, naming the file and offset)",
    ),
    "tokenizer_sample": (
        f"{TOKENIZER_SAMPLE >> 20}MB",
        "when a tokenizer is trained from raw text: how much text it learns from, a seeded sample across "
        "the whole corpus (e.g. 16MB, 1GB); memory follows it",
    ),
}


# ---- the validation split --------------------------------------------------------------------------------


def choose_val(sizes: list[int], val_fraction: float, seed: int = 0) -> set[int] | None:
    """Indices of whole documents (by size) making up about val_fraction of the total: a seeded order,
    skipping any that would overshoot it by half, always keeping one for training. None when whole documents
    cannot make at least half the share (one document, or a few large ones): split by tail instead."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"validation fraction must be in [0, 1), got {val_fraction}")
    target = val_fraction * sum(sizes)
    order = list(range(len(sizes)))
    random.Random(seed).shuffle(order)
    val, total = set(), 0
    for i in order:
        if total >= target or len(val) == len(sizes) - 1:
            break
        if total + sizes[i] <= 1.5 * target:
            val.add(i)
            total += sizes[i]
    return val if len(sizes) > 1 and total >= 0.5 * target else None


def record_in_val(source: str, val_fraction: float, seed: int) -> bool:
    """A record (jsonl line, Parquet row) goes to validation by a seeded hash of where it is."""
    return zlib.crc32(f"{seed}:{source}".encode()) < val_fraction * 2**32


@dataclass
class SplitPlan:
    val_files: set[str] | None  # text files held out whole; None: every text file gives its tail
    val_fraction: float
    seed: int

    @property
    def mode(self) -> str:
        return "document" if self.val_files is not None else "tail"


def plan_split(files: list[Path], val_fraction: float, seed: int) -> SplitPlan:
    text = [p for p in files if kind(p)[0] not in ("jsonl", "parquet")]
    val = choose_val([p.stat().st_size for p in text], val_fraction, seed) if text else set()
    return SplitPlan(None if val is None else {str(text[i]) for i in val}, val_fraction, seed)


def _segments(doc: StreamedDocument, plan: SplitPlan) -> Iterator[tuple[str, Iterator[str]]]:
    """(split, parts) for the pieces of one document: all of it in one split, or (tail mode) its head in
    train and, after the cut, its tail in validation."""
    if doc.record:
        yield ("val" if record_in_val(doc.source, plan.val_fraction, plan.seed) else "train"), iter(doc.parts)
    elif plan.val_files is not None or plan.val_fraction == 0:
        yield ("val" if plan.val_files and doc.source in plan.val_files else "train"), iter(doc.parts)
    else:
        yield from _tail_segments(doc, plan.val_fraction)


def _tail_segments(doc: StreamedDocument, val_fraction: float) -> Iterator[tuple[str, Iterator[str]]]:
    """Head and tail of a text file read in blocks: the cut is the first line break at or after
    (1 - val_fraction) of its bytes (a compressed file's are counted by reading it through once first)."""
    parts = iter(doc.parts)
    nbytes = doc.nbytes if doc.nbytes >= 0 else decompressed_size(Path(doc.source))
    cut_at = int(nbytes * (1 - val_fraction))
    state = {"tail": None}

    def head() -> Iterator[str]:
        seen = 0
        for p in parts:
            size = len(p.encode())
            if state["tail"] is None and seen + size > cut_at:
                local = len(p.encode()[: max(cut_at - seen, 0)].decode("utf-8", "ignore"))
                nl = p.find("\n", local)
                if nl >= 0:
                    yield p[: nl + 1]
                    state["tail"] = p[nl + 1 :]
                    return
            seen += size
            yield p
        state["tail"] = ""

    yield "train", head()

    def tail() -> Iterator[str]:
        if state["tail"]:
            yield state["tail"]
        yield from parts

    yield "val", tail()


# ---- tokenising ----------------------------------------------------------------------------------------


def _safe_cut(text: str, size: int) -> int:
    """A cut position at or after `size` where the split pattern must break: after a newline followed by
    a non-space character (the pattern never joins the two); -1 when the text has none after `size`."""
    cut = size
    while cut < len(text):
        nl = text.find("\n", cut - 1)
        if nl < 0 or nl + 1 >= len(text):
            return -1
        if not text[nl + 1].isspace():
            return nl + 1
        cut = nl + 2
    return -1


def _chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut text into ~size pieces at safe cuts (see _safe_cut): encoding the pieces separately gives exactly
    the ids of the whole text."""
    return list(rechunk([text], size))


def rechunk(parts: Iterable[str], size: int = CHUNK_CHARS) -> Iterator[str]:
    """The text of consecutive parts, re-cut into ~size pieces at safe cuts: whatever the parts' own
    boundaries (a file's blocks), the pieces encode to the ids of the whole text."""
    buf = ""
    for p in parts:
        buf += p
        while len(buf) > size:
            cut = _safe_cut(buf, size)
            if cut < 0:
                break
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


_WORKER_TOK: Tokenizer | None = None
_WORKER_DTYPE = np.dtype(np.uint32)


def _init_worker(tokenizer_json: str, dtype: str = "uint32", parent: int = 0) -> None:
    global _WORKER_TOK, _WORKER_DTYPE
    from tokenizers import Tokenizer as HF

    if parent:
        _die_with(parent)

    _WORKER_TOK = Tokenizer(HF.from_str(tokenizer_json))
    _WORKER_DTYPE = np.dtype(dtype)


def _die_with(parent: int) -> None:
    """This worker ends when the process that made it does, however that ends: a worker blocks on its queue, whose
    pipe every worker also holds open, so a prepare killed with SIGKILL would leave its workers waiting forever.
    Linux: the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG); a parent already gone ends it
    now."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the call above
        os._exit(1)


def _encode_chunk(text: str) -> np.ndarray:
    return np.asarray(_WORKER_TOK.encode(text), dtype=_WORKER_DTYPE)


def _encode_group(texts: list[str | None]) -> list[tuple[np.ndarray | None, int]]:
    """(ids in the shards' dtype, UTF-8 bytes) of each text of a task; None (already in a shard) stays None.
    Counting bytes here keeps that pass over the text off the one process that reads the corpus."""
    return [(None, 0) if t is None else (_encode_chunk(t), len(t.encode())) for t in texts]


def bounded_map(pool: ProcessPoolExecutor | None, fn, items: Iterable, ahead: int) -> Iterator:
    """fn over items, in order, with at most `ahead` in flight (Executor.map would submit them all at once,
    holding the whole corpus in its queue). pool None: in this process."""
    if pool is None:
        yield from map(fn, items)
        return
    window: deque = deque()
    for item in items:
        window.append(pool.submit(fn, item))
        if len(window) >= ahead:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---- shards -------------------------------------------------------------------------------------------------


class _ShardWriter:
    """One split's shards: ids are appended; a full shard is written atomically and recorded."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int, done: list[dict]):
        self.out, self.split, self.dtype, self.cap = out, split, dtype, shard_tokens
        self.shards = list(done)  # shards already on disk (a resumed prepare)
        self.committed = sum(s["tokens"] for s in done)
        self.buf = np.empty(min(shard_tokens, 1 << 22), dtype=dtype)  # grows to the shard's size as ids come
        self.n = 0
        self.skip = 0  # ids to drop before appending (already in a shard written before a resume)

    def add(self, ids: np.ndarray) -> bool:
        """Append ids; True when a shard was written."""
        if self.skip:
            drop = min(self.skip, len(ids))
            ids, self.skip = ids[drop:], self.skip - drop
        wrote = False
        while len(ids):
            if self.n + len(ids) > len(self.buf) and len(self.buf) < self.cap:
                grown = np.empty(min(self.cap, max(2 * len(self.buf), self.n + len(ids))), dtype=self.dtype)
                grown[: self.n] = self.buf[: self.n]
                self.buf = grown
            take = min(self.cap - self.n, len(ids))
            self.buf[self.n : self.n + take] = ids[:take]
            self.n += take
            ids = ids[take:]
            if self.n == self.cap:
                self.flush()
                wrote = True
        return wrote

    def flush(self) -> None:
        if not self.n and self.shards:
            return
        name = f"{self.split}-{len(self.shards):05d}.bin"
        data = memoryview(self.buf[: self.n]).cast("B")  # the bytes in place: no copy of a 128 MB shard
        ckpt.atomic_write_bytes(self.out / name, data)
        self.shards.append({"file": name, "tokens": int(self.n), "sha256": hashlib.sha256(data).hexdigest()})
        self.committed += self.n
        self.n = 0


def prepare(
    sources: list[str] | str,
    tok: Tokenizer,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.1,
    seed: int = 0,
    text_field: str = "text",
    workers: int | None = None,
    progress: bool = True,
    errors: str = DEFAULT_ERRORS,
    shard_tokens: int = SHARD_TOKENS,
    log=None,
    stop_after_shards: int = 0,
) -> dict:
    """Tokenise a corpus into out_dir (see the module docstring); returns meta.json's content. A folder left
    by a killed prepare of the same corpus and settings is resumed; anything else in out_dir is refused.
    Long because it is one straight sequence (plan, resume, encode and write, finish) whose cleanup on a
    failure needs every piece it set up at hand.

    Example:
        >>> meta = prepare("my_texts/", tok, "data/mine", errors="replace")   # doctest: +SKIP
    """
    sources = [sources] if isinstance(sources, str) else list(sources)
    out = Path(out_dir)
    files = source_files(sources)
    plan = plan_split(files, val_fraction, seed)
    dtype = token_dtype(tok.vocab_size)
    settings = _settings(sources, files, tok, dtype, plan, text_field, errors, shard_tokens)
    created = not out.exists()
    resume = _start(out, settings)
    stats = ReadStats()  # documents, skipped documents and replaced characters (the encoding policy)
    # [split, number of ids] of each piece whose ids are all in written shards
    done_jobs: list[list] = resume.get("jobs", [])
    writers = _writers(out, dtype, shard_tokens, resume.get("shards", {}), done_jobs)
    bar = tqdm(
        total=sum(p.stat().st_size for p in files),
        unit="B",
        unit_scale=True,
        desc="prepare",
        disable=not progress,
        leave=False,
    )
    reader = _Reader(sources, text_field, errors, stats, plan, len(done_jobs), bar)

    def shard_written(jobs: list[list]) -> None:
        _save_progress(out, settings, writers, jobs)
        if stop_after_shards and sum(len(w.shards) for w in writers.values()) >= stop_after_shards:
            raise _Stop()

    workers = workers or min(os.cpu_count() or 1, 8)
    pool = _encoders(tok, dtype, workers)
    results = bounded_map(pool, _encode_group, reader.tasks(), 2 * workers)
    try:
        counts = _write(results, reader.tags, writers, done_jobs, np.asarray([tok.eot_id], dtype=dtype), shard_written)
        if not reader.has_text:
            raise DataError(
                f"no text in {', '.join(sources)}: the corpus is empty"
                + (f" ({stats.summary()})" if stats.skipped else "")
            )
        for w in writers.values():
            w.flush()
    except _Stop:
        raise  # a kill (tests stop here on purpose): the shards stay, to resume
    except Exception:  # any failure, whatever raised it (the input's, a worker's): leave nothing behind;
        _abandon(out, created)  # a kill or Ctrl-C keeps the shards written so far, to resume
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    if log and stats.summary():
        log(f"encoding: {stats.summary()}")
    return _finish(out, tok, settings, writers, counts, stats)


def _settings(
    sources: list[str],
    files: list[Path],
    tok: Tokenizer,
    dtype: np.dtype,
    plan: SplitPlan,
    text_field: str,
    errors: str,
    shard_tokens: int,
) -> dict:
    """What decides the shards: a prepare resumes only one with the same (meta.json keeps all but the files)."""
    return {
        "format": FORMAT,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "split": plan.mode,
        "val_fraction": plan.val_fraction,
        "seed": plan.seed,
        "text_field": text_field,
        "encoding_errors": errors,
        "shard_tokens": shard_tokens,
        "sources": [str(s) for s in sources],
        "files": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def _encoders(tok: Tokenizer, dtype: np.dtype, workers: int) -> ProcessPoolExecutor | None:
    """The worker processes that encode; None for one worker, when this process encodes."""
    if workers > 1:
        return ProcessPoolExecutor(
            workers, initializer=_init_worker, initargs=(tok.hf.to_str(), dtype.name, os.getpid())
        )
    _init_worker(tok.hf.to_str(), dtype.name)
    return None


def _writers(
    out: Path, dtype: np.dtype, shard_tokens: int, shards: dict[str, list[dict]], done_jobs: list[list]
) -> dict[str, _ShardWriter]:
    """Each split's writer, with the shards a resumed prepare already wrote; each drops, before appending, the
    ids of its split already in them beyond the pieces whose ids are all there (done_jobs), since those
    pieces are encoded again."""
    writers = {}
    for s in SPLITS:
        w = _ShardWriter(out, s, dtype, shard_tokens, shards.get(s, []))
        w.skip = w.committed - sum(n for sp, n in done_jobs if sp == s)
        writers[s] = w
    return writers


class _Reader:
    """The corpus as tasks for the workers: every piece's text in order, grouped into tasks of ~CHUNK_CHARS
    (a directory of small files would otherwise cost a round trip to a worker per file). The first `n_done`
    pieces, whose ids are already in written shards (a resumed prepare), are read but not encoded again (None).

    For each task handed out, `tags` gets the (split, starts a document, UTF-8 bytes) of its pieces, in order,
    for whoever writes the workers' results (the bytes of a piece that is encoded are counted by its worker: 0);
    `has_text` says whether any piece so far was more than white space."""

    def __init__(
        self, sources: list[str], text_field: str, errors: str, stats: ReadStats, plan: SplitPlan, n_done: int, bar
    ):
        self.sources, self.text_field, self.errors, self.stats, self.plan = sources, text_field, errors, stats, plan
        self.n_done, self.bar = n_done, bar
        self.tags: deque[list[tuple[str, bool, int]]] = deque()
        self.has_text = False

    def pieces(self) -> Iterator[tuple[str, bool, str]]:
        """(split, starts a document, text) of every piece of the corpus, in order."""
        for doc in iter_documents(self.sources, self.text_field, self.errors, self.stats):
            for split, parts in _segments(doc, self.plan):
                for i, text in enumerate(rechunk(parts)):
                    yield split, i == 0, text

    def tasks(self) -> Iterator[list[str | None]]:
        group, tag, size = [], [], 0
        for n_read, (split, first, text) in enumerate(self.pieces()):
            self.has_text = self.has_text or not text.isspace()
            self.bar.update(len(text))
            done = n_read < self.n_done
            group.append(None if done else text)
            tag.append((split, first, len(text.encode()) if done else 0))
            size += len(text)
            if size >= CHUNK_CHARS:
                self.tags.append(tag)
                yield group
                group, tag, size = [], [], 0
        if group:
            self.tags.append(tag)
            yield group


def _write(
    results: Iterator[list[tuple[np.ndarray | None, int]]],
    tags: deque,
    writers: dict[str, _ShardWriter],
    done_jobs: list[list],
    eot: np.ndarray,
    shard_written,
) -> dict[str, dict[str, int]]:
    """Append the workers' ids to their split's shards (a document's preceded by <|endoftext|>), calling
    shard_written(jobs) after each shard written, jobs being the [split, number of ids] of every piece so far;
    returns each split's documents and bytes."""
    counts = {s: {"documents": 0, "bytes": 0} for s in SPLITS}
    jobs: list[list] = []
    for group in results:
        for (split, first, done_bytes), (ids, nbytes) in zip(tags.popleft(), group):
            counts[split]["documents"] += first
            if ids is None:  # already in shards
                counts[split]["bytes"] += done_bytes
                jobs.append(done_jobs[len(jobs)])
                continue
            counts[split]["bytes"] += nbytes
            if first:
                ids = np.concatenate([eot, ids])
            jobs.append([split, int(len(ids))])
            if writers[split].add(ids):
                shard_written(jobs)
    return counts


def _finish(
    out: Path, tok: Tokenizer, settings: dict, writers: dict[str, _ShardWriter], counts: dict, stats: ReadStats
) -> dict:
    """Write the tokenizer, then meta.json (which marks the folder complete), and drop progress.json."""
    tok.save(out / "tokenizer.json")
    meta = {
        **settings,
        "splits": {s: {"tokens": writers[s].committed, **counts[s], "shards": writers[s].shards} for s in SPLITS},
        "documents": stats.documents,
        "skipped_documents": stats.skipped,
        "replaced_characters": stats.replaced,
    }
    meta.pop("files")
    ckpt.atomic_write_text(out / "meta.json", ckpt.dumps(meta, indent=2) + "\n")
    (out / "progress.json").unlink(missing_ok=True)
    return meta


class _Stop(Exception):
    """Raised by stop_after_shards (tests: a prepare killed after N shards)."""


def _start(out: Path, settings: dict) -> dict:
    """Make out ready: new, empty, or a prepare of the same corpus and settings to resume (its progress)."""
    ckpt.check_output(out, "--out", is_dir=True)
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return {}
    if (out / "meta.json").is_file():
        raise DataError(f"{out} already holds prepared data; choose another --out (or delete it to prepare again)")
    progress = out / "progress.json"
    if progress.is_file():
        state = json.loads(progress.read_text())
        if state.get("settings") == settings:
            for stray in out.glob(".*.tmp"):  # a shard a kill cut off mid-write: written again
                stray.unlink()
            for split, shards in state["shards"].items():
                for s in shards:
                    f = out / s["file"]
                    if not f.is_file() or f.stat().st_size != s["tokens"] * np.dtype(settings["dtype"]).itemsize:
                        raise DataError(f"{f} is missing or cut short; delete {out} and prepare again")
            return state
        raise DataError(
            f"{out} holds an unfinished prepare of other data or settings; delete it or choose another --out"
        )
    raise DataError(f"{out} exists and is not a prepared data directory; choose another --out")


def _save_progress(out: Path, settings: dict, writers: dict, jobs: list[list]) -> None:
    """Where the stream stands after a shard: the pieces whose ids are all in written shards (in order,
    up to the first that is not), and the shards."""
    left = {s: w.committed for s, w in writers.items()}
    k = 0
    for split, n in jobs:
        if left[split] < n:
            break
        left[split] -= n
        k += 1
    state = {"settings": settings, "shards": {s: w.shards for s, w in writers.items()}, "jobs": jobs[:k]}
    ckpt.atomic_write_text(out / "progress.json", json.dumps(state))


def _abandon(out: Path, created: bool) -> None:
    """Remove what this prepare wrote: shards, progress, temporary files (and the folder if it made it)."""
    for p in out.iterdir():
        if p.is_file() and (p.suffix in (".bin", ".tmp") or p.name == "progress.json"):
            p.unlink()
    if created and not any(out.iterdir()):
        out.rmdir()


# ---- a bounded sample for the tokenizer ---------------------------------------------------------------------


def tokenizer_sample(
    sources: list[str] | str,
    budget: int = TOKENIZER_SAMPLE,
    seed: int = 0,
    text_field: str = "text",
    errors: str = DEFAULT_ERRORS,
) -> tuple[list[str], int]:
    """(pieces, bytes read): pieces of the corpus (~8 KB, cut between pre-tokens) drawn with a seeded chance
    so that about `budget` bytes are kept, spread over the whole corpus (at most 1.2 x budget: memory stays
    bounded even where compressed files hold more than their size on disk suggests)."""
    sources = [sources] if isinstance(sources, str) else list(sources)
    total = sum(p.stat().st_size for p in source_files(sources))
    share = min(1.0, budget / max(total, 1))
    rng = random.Random(seed)
    pieces, taken, seen = [], 0, 0
    for doc in iter_documents(sources, text_field, errors):
        for text in rechunk(doc.parts, SAMPLE_PIECE):
            n = len(text.encode())
            seen += n
            if taken < 1.2 * budget and rng.random() < share:
                taken += n
                pieces.append(text)
    if not any(not p.isspace() for p in pieces):
        raise DataError(f"no text in {', '.join(sources)}: the corpus is empty")
    return pieces, seen


def parse_size(text: str | int, flag: str) -> int:
    """'64MB' -> 64 * 2**20 bytes, '1.5GB', '500kB', '1000000' (bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?)?\s*", str(text).lower())
    if not m:
        raise ConfigError(f"{flag} {text!r} is not a size; write e.g. 64MB, 1GB or a number of bytes")
    unit = (m.group(2) or "b")[0]
    value = float(m.group(1)) * {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    if value < 1:
        raise ConfigError(f"{flag} must be positive, got {text!r}")
    return int(value)


def train_tokenizer(
    sources: list[str] | str,
    vocab_size: int,
    sample: int = TOKENIZER_SAMPLE,
    text_field: str = "text",
    errors: str = DEFAULT_ERRORS,
    log=print,
    progress: bool = False,
) -> Tokenizer:
    """A tokenizer learned from a seeded sample of about `sample` bytes drawn across the whole corpus (memory
    follows the sample, not the corpus); the log says how much of the corpus it learned from."""
    t0 = time.time()
    pieces, seen = tokenizer_sample(sources, sample, 0, text_field, errors)
    taken = sum(len(p.encode()) for p in pieces)
    tok = Tokenizer.train(pieces, vocab_size, show_progress=progress, length=len(pieces))
    share = taken / max(seen, 1)
    log(
        f"trained a {tok.vocab_size}-token tokenizer in {time.time() - t0:.1f}s on {_bytes(taken)} of {_bytes(seen)} "
        "of text "
        f"({share:.1%} of the corpus{', a seeded sample; --tokenizer-sample sets its size' if share < 1 else ''})"
    )
    return tok


def _bytes(n: float) -> str:
    return next(
        f"{n / d:,.1f} {u}"
        for d, u in ((1 << 30, "GB"), (1 << 20, "MB"), (1 << 10, "kB"), (1, "bytes"))
        if n >= d or d == 1
    )
