"""Corpus reading, prepare() -> token files + meta.json, and batch samplers over them.

A prepared directory holds:
    train.bin, val.bin   flat token ids (uint16 when the vocabulary fits, else uint32), each document
                         preceded by <|endoftext|>, memory-mapped for random access
    tokenizer.json       the tokenizer that produced them
    meta.json            counts, dtype, split, sources and the tokenizer's sha256
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gradlm import datasets
from gradlm import checkpoint as ckpt
from gradlm.checkpoint import atomic_write_dir
from gradlm.errors import DataError
from gradlm.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CHUNK_CHARS = 1 << 20  # tokenise in ~1 MB pieces, in parallel


@dataclass
class Document:
    source: str
    text: str


# ---- reading ----------------------------------------------------------------------------------------


def _kind(path: Path) -> tuple[str, bool]:
    """('text' | 'jsonl' | '', gzipped) from the file name."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", gz
    if name.endswith(TEXT_SUFFIXES):
        return "text", gz
    return "", gz


def _decode(raw: bytes, where: str) -> str:
    if b"\x00" in raw[:65536]:
        raise DataError(f"{where} looks binary (it contains NUL bytes); gradlm reads UTF-8 text, .jsonl and .gz of those")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where} is not valid UTF-8 (bad byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def read_text(path: Path) -> str:
    """A file's text (gunzipped when it ends in .gz), with one clear error for a missing, unreadable,
    binary or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    return _decode(raw, str(path))


def jsonl_objects(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a .jsonl file (or .jsonl.gz)."""
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n} is not JSON ({e.msg}); each line must be one JSON value") from None


def _read_file(path: Path, text_field: str) -> list[Document]:
    if _kind(path)[0] != "jsonl":
        return [Document(str(path), read_text(path))]
    docs = []
    for n, obj in jsonl_objects(path):
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise DataError(f"{path} line {n} has no string field {text_field!r}; set --text-field to the field that holds the text")
        docs.append(Document(f"{path}:{n}", obj[text_field]))
    return docs


def locate(src: str) -> Path:
    """The path a --data source names: an existing file/directory, or a registered corpus (fetched)."""
    path = Path(src)
    if path.exists():
        return path
    if src in datasets.REGISTRY:
        return datasets.resolve(src)
    raise DataError(f"no such file or directory: {src} (registered datasets: {', '.join(sorted(datasets.REGISTRY))})")


def read_documents(sources: list[str] | str, text_field: str = "text") -> list[Document]:
    """Read text from files, directories (recursively), .jsonl, .gz of those, or registered dataset names."""
    if isinstance(sources, str):
        sources = [sources]
    docs: list[Document] = []
    for src in sources:
        path = locate(src)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p)[0])
            if not files:
                raise DataError(f"{path} holds no .txt, .md, .jsonl or .gz files")
            for f in files:
                docs.extend(_read_file(f, text_field))
        else:
            if not _kind(path)[0]:
                # An unknown suffix is read as text; _decode still rejects binaries.
                docs.append(Document(str(path), _decode(path.read_bytes(), str(path))))
            else:
                docs.extend(_read_file(path, text_field))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"no text in {', '.join(map(str, sources))}: the corpus is empty")
    return docs


def _tail_split(text: str, val_fraction: float) -> tuple[str, str]:
    """(head, tail) with the tail about val_fraction of text, cut after a line break when one is near."""
    cut = int(len(text) * (1 - val_fraction))
    nl = text.rfind("\n", 0, cut)
    if nl > len(text) // 2:
        cut = nl + 1
    return text[:cut], text[cut:]


def split_documents(docs: list[Document], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str], str]:
    """Train/validation texts, about val_fraction of the characters held out.

    By document when whole documents can make up that share: a seeded choice of documents, skipping any
    that would overshoot it by half (one large file must not swallow the validation set). Otherwise
    (a single file, or a few large ones) by tail: the last val_fraction of each document, cut at a line break.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"validation fraction must be in [0, 1), got {val_fraction}")
    target = val_fraction * sum(len(d.text) for d in docs)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    val, chars = set(), 0
    for i in order:
        if chars >= target or len(val) == len(docs) - 1:  # always keep a training document
            break
        if chars + len(docs[i].text) <= 1.5 * target:
            val.add(i)
            chars += len(docs[i].text)
    if len(docs) > 1 and chars >= 0.5 * target:
        return [d.text for i, d in enumerate(docs) if i not in val], [d.text for i, d in enumerate(docs) if i in val], "document"
    pairs = [_tail_split(d.text, val_fraction) for d in docs]
    return [h for h, _ in pairs], [t for _, t in pairs if t.strip()], "tail"


# ---- tokenising -------------------------------------------------------------------------------------


def _chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut text into ~size pieces, only after a newline that is followed by a non-space character.

    The split pattern never joins a newline with a following non-space character, so each cut is a
    pre-token boundary and encoding the pieces separately gives exactly the ids of the whole text.
    """
    out, start = [], 0
    while len(text) - start > size:
        cut = start + size
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut].isspace()):
            cut += 1
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


_WORKER_TOK: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOK
    from tokenizers import Tokenizer as HF

    _WORKER_TOK = Tokenizer(HF.from_str(tokenizer_json))


def _encode_chunk(text: str) -> np.ndarray:
    return np.asarray(_WORKER_TOK.encode(text), dtype=np.uint32)


def tokenize_documents(
    docs: list[str], tok: Tokenizer, workers: int | None = None, progress: bool = True, desc: str = "tokenize"
) -> np.ndarray:
    """Concatenate the documents' ids, each document preceded by <|endoftext|>."""
    pieces: list[tuple[int, str]] = []  # (document index, chunk)
    for d, text in enumerate(docs):
        pieces.extend((d, c) for c in _chunks(text))
    workers = workers or min(os.cpu_count() or 1, 8)
    total = sum(len(c) for _, c in pieces)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False)
    texts = [c for _, c in pieces]
    if workers <= 1 or len(pieces) < 2:
        results = []
        for c in texts:
            results.append(np.asarray(tok.encode(c), dtype=np.uint32))
            bar.update(len(c))
    else:
        results = []
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tok.hf.to_str(),)) as pool:
            for c, ids in zip(texts, pool.map(_encode_chunk, texts)):
                results.append(ids)
                bar.update(len(c))
    bar.close()
    out: list[np.ndarray] = []
    eot = np.asarray([tok.eot_id], dtype=np.uint32)
    prev = -1
    for (d, _), ids in zip(pieces, results):
        if d != prev:
            out.append(eot)
            prev = d
        out.append(ids)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint32)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def prepare(
    sources: list[str] | str,
    tok: Tokenizer,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.1,
    seed: int = 0,
    text_field: str = "text",
    workers: int | None = None,
    progress: bool = True,
    docs: list[Document] | None = None,
) -> dict:
    """Tokenise a corpus into out_dir (train.bin, val.bin, tokenizer.json, meta.json), atomically.

    Example:
        >>> meta = prepare("shakespeare", tok, "data/shakespeare")   # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / "meta.json").is_file() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir} exists and is not a prepared data directory; choose another --out")
    docs = docs if docs is not None else read_documents(sources, text_field)
    train_docs, val_docs, mode = split_documents(docs, val_fraction, seed)
    dtype = token_dtype(tok.vocab_size)
    meta = {
        "format": 1,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "split": mode,
        "val_fraction": val_fraction,
        "seed": seed,
        "sources": [str(s) for s in ([sources] if isinstance(sources, str) else sources)],
        "splits": {},
    }

    def write(tmp: Path) -> None:
        for name, texts in (("train", train_docs), ("val", val_docs)):
            ids = tokenize_documents(texts, tok, workers, progress, desc=f"tokenize {name}")
            ids = ids.astype(dtype)
            ids.tofile(tmp / f"{name}.bin")
            meta["splits"][name] = {"tokens": int(len(ids)), "bytes": sum(len(t.encode()) for t in texts), "documents": len(texts),
                                    "sha256": hashlib.sha256(ids.tobytes()).hexdigest()}
        tok.save(tmp / "tokenizer.json")
        (tmp / "meta.json").write_text(ckpt.dumps(meta, indent=2) + "\n")

    atomic_write_dir(out_dir, write)
    return meta


# ---- loading and sampling ---------------------------------------------------------------------------


class TokenData:
    """A prepared directory, memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{self.path} is not prepared data (no meta.json); run `gradlm prepare` or pass raw text")
        self.meta = json.loads(meta_path.read_text())
        self.tokenizer = Tokenizer.load(self.path / "tokenizer.json")
        if self.tokenizer.sha256 != self.meta["tokenizer_sha256"]:
            raise DataError(f"{self.path}: tokenizer.json does not match the one the tokens were made with; prepare again")
        dtype = np.dtype(self.meta["dtype"])
        self.splits = {}
        for name in ("train", "val"):
            f = self.path / f"{name}.bin"
            n = self.meta["splits"][name]["tokens"]
            self.splits[name] = np.memmap(f, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)

    def tokens(self, split: str) -> np.ndarray:
        return self.splits[split]

    @property
    def identity(self) -> str:
        """A content hash of the data a run trains on: the tokenizer and the token ids of both splits. A run
        records it, so a resume finds its own tokens again wherever they are cached, and never trains on
        other ones by mistake."""
        h = hashlib.sha256(self.meta["tokenizer_sha256"].encode())
        for name in ("train", "val"):
            digest = self.meta["splits"][name].get("sha256")
            if digest is None:  # prepared before the hashes were recorded
                digest = hashlib.sha256(np.ascontiguousarray(self.splits[name]).tobytes()).hexdigest()
            h.update(f"|{name}:{digest}".encode())
        return h.hexdigest()[:32]


def windows(tokens: np.ndarray, starts: torch.Tensor | list[int], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x[b] = tokens[s:s+block], targets y[b] = tokens[s+1:s+block+1] for each start s."""
    rows = np.stack([np.asarray(tokens[int(s) : int(s) + block + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(rows)
    return t[:, :-1], t[:, 1:]


class RandomSampler:
    """Batches of windows at uniformly random offsets (seeded); its state is one generator state."""

    def __init__(self, tokens: np.ndarray, block: int, seed: int):
        if len(tokens) < block + 1:
            raise DataError(f"only {len(tokens)} training tokens, fewer than the context window + 1 ({block + 1}); lower --block-size or add text")
        self.tokens, self.block = tokens, block
        self.gen = torch.Generator().manual_seed(seed)

    def next(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.tokens) - self.block, (batch,), generator=self.gen)
        return windows(self.tokens, starts, self.block)

    def state_dict(self) -> dict:
        return {"kind": "random", "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])


class EpochSampler:
    """Every non-overlapping window once per epoch, in a seeded shuffled order.

    Window w covers tokens[w*block : w*block + block + 1]. Epoch e uses the permutation drawn from
    seed + e, so the order is reproducible and resumable from (epoch, position) alone. A batch never
    crosses an epoch: the last batch of an epoch may be smaller.
    """

    def __init__(self, tokens: np.ndarray, block: int, seed: int):
        self.n_windows = (len(tokens) - 1) // block
        if self.n_windows < 1:
            raise DataError(f"only {len(tokens)} training tokens, fewer than the context window + 1 ({block + 1}); lower --block-size or add text")
        self.tokens, self.block, self.seed = tokens, block, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n_windows, generator=torch.Generator().manual_seed(self.seed + epoch))

    def order(self, epoch: int) -> list[int]:
        """Window indices in the order epoch `epoch` visits them."""
        return self._perm(epoch).tolist()

    def next(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._order[self.pos : self.pos + batch]
        self.pos += len(idx)
        x, y = windows(self.tokens, (idx * self.block).tolist(), self.block)
        if self.pos >= self.n_windows:
            self.epoch += 1
            self.pos = 0
            self._order = self._perm(self.epoch)
        return x, y

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.pos / self.n_windows

    def state_dict(self) -> dict:
        return {"kind": "epoch", "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._perm(self.epoch)


# ---- training data: prepared once, cached --------------------------------------------------------------------------------------------


def _source_files(sources: list[str]) -> list[Path]:
    files = []
    for s in sources:
        p = locate(s)
        files += sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    return files


def _source_key(sources: list[str], extra: dict) -> str:
    """Cache key of raw text: paths, sizes and modification times of every file, plus the settings."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for f in _source_files(sources):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def source_bytes(data: str) -> int:
    """Size on disk of the raw text a --data source names (compressed files count as stored)."""
    return sum(f.stat().st_size for f in _source_files([data]))


def is_prepared(data: str) -> bool:
    """Whether --data names a `gradlm prepare` directory (tokens and tokenizer already made)."""
    p = Path(data)
    return p.is_dir() and (p / "meta.json").is_file()


def find_prepared(identity: str, hint: str | os.PathLike | None = None) -> TokenData | None:
    """The prepared data with this identity (see TokenData.identity): at hint (the folder a run recorded)
    or anywhere in the cache of prepared text; None if there is none. Reads no raw text, so it works offline."""
    hinted = Path(hint) if hint else None
    cache = datasets.cache_dir() / "prepared"
    places = ([hinted] if hinted else []) + (sorted(p for p in cache.iterdir() if p != hinted) if cache.is_dir() else [])
    for p in places:
        if not (p / "meta.json").is_file():
            continue
        try:
            data = TokenData(p)
            # elsewhere in the cache only folders that carry their hashes are looked at (no hashing of every folder)
            if (p == hinted or all("sha256" in s for s in data.meta["splits"].values())) and data.identity == identity:
                return data
        except (DataError, OSError, ValueError, KeyError, json.JSONDecodeError):
            continue  # a folder left half-made or corrupt is not ours
    return None


def resolve_data(cfg, tokenizer: Tokenizer | None = None, log=print, trained_here: bool | None = None, identity: str = "", hint: str = "") -> TokenData:
    """The data of a training run (cfg: a TrainConfig): a prepared directory as it is, or raw text
    tokenised (and the tokenizer trained) once and cached.

    The cache key names the text, the settings and the tokenizer: "trained" when the tokenizer is (or
    was, for a resumed run) trained from this text, else the given tokenizer's hash. So a run and its
    resume read the same cache; if the cache is gone, the resume re-tokenises with the run's tokenizer.
    A resumed run passes the identity of the tokens it trained on (and where they were): they are used
    wherever they are found without reading the raw text (offline), and other tokens are refused.
    """
    if identity:
        found = find_prepared(identity, hint)
        if found is not None:
            return found
    data = _resolve_data(cfg, tokenizer, log, trained_here)
    if identity and data.identity != identity:
        raise DataError(
            f"--data {cfg.data} no longer gives the tokens this run trained on (identity {data.identity}, the run recorded {identity}); "
            "restore the original text or prepared folder, or start a new run from this one with --init"
        )
    return data


def _resolve_data(cfg, tokenizer: Tokenizer | None, log, trained_here: bool | None) -> TokenData:
    if is_prepared(cfg.data):
        return TokenData(Path(cfg.data))
    sources = [cfg.data]
    trained_here = tokenizer is None if trained_here is None else trained_here
    tok_key = "trained" if trained_here else tokenizer.sha256
    key = _source_key(sources, {"vocab": cfg.vocab_size, "val": cfg.val_fraction, "field": cfg.text_field, "tok": tok_key})
    cached = datasets.cache_dir() / "prepared" / key
    if (cached / "meta.json").is_file():
        data = TokenData(cached)
        if tokenizer is None or data.tokenizer.sha256 == tokenizer.sha256:
            return data
    docs = read_documents(sources, cfg.text_field)
    if tokenizer is None:
        t0 = time.time()
        tokenizer = Tokenizer.train((d.text for d in docs), cfg.vocab_size, length=len(docs))
        log(f"trained a {tokenizer.vocab_size}-token tokenizer in {time.time() - t0:.1f}s")
    t0 = time.time()
    meta = prepare(sources, tokenizer, cached, cfg.val_fraction, seed=0, text_field=cfg.text_field, progress=cfg.progress and sys.stderr.isatty(), docs=docs)
    log(f"tokenised {meta['splits']['train']['tokens']:,} train + {meta['splits']['val']['tokens']:,} val tokens in {time.time() - t0:.1f}s (cached in {cached})")
    return TokenData(cached)
