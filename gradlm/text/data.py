"""Training data: prepared token shards, memory-mapped, the batch samplers over them, and the cache of
raw text prepared once for `gradlm train --data TEXT`.

A prepared directory (gradlm/text/prepare.py writes it) holds train-NNNNN.bin / val-NNNNN.bin shards of token
ids, tokenizer.json and meta.json. The shards of a split are read as one stream (`Tokens`), never
concatenated in memory: a window may span two shards, exactly as if the split were one file. A folder made
by gradlm before the shards (train.bin, val.bin, meta.json format 1) reads the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gradlm.layout import cache_dir
from gradlm.text.corpus import source_files
from gradlm.errors import DataError
from gradlm.text.prepare import parse_size, prepare, train_tokenizer
from gradlm.text.tokenizer import Tokenizer


class Tokens:
    """The token ids of one split as one sequence over its shards (memory maps): len(), t[i], t[a:b] (a numpy
    array, copied from the shards it spans) and dtype, as a numpy array would give them."""

    def __init__(self, parts: list[np.ndarray], dtype: np.dtype):
        self.parts = [p for p in parts if len(p)]
        self.dtype = np.dtype(dtype)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step != 1:
                return self[a:b][::step]
            if len(self.parts) == 1:
                return np.asarray(self.parts[0][a:b])
            out, i = [], int(np.searchsorted(self.starts, a, side="right")) - 1
            while a < b:
                lo = a - self.starts[i]
                take = min(b - a, len(self.parts[i]) - lo)
                out.append(self.parts[i][lo : lo + take])
                a += take
                i += 1
            return np.concatenate(out) if out else np.zeros(0, self.dtype)
        i = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(key)
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[s][i - self.starts[s]]

    def __array__(self, dtype=None, copy=None):
        out = self[0 : len(self)]
        return out.astype(dtype) if dtype is not None else out

    def tolist(self) -> list[int]:
        return self[0 : len(self)].tolist()


class TokenData:
    """A prepared directory: its tokenizer, meta.json and each split's ids as `Tokens` over its shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{self.path} is not prepared data (no meta.json); run `gradlm prepare` or pass raw text")
        self.meta = json.loads(meta_path.read_text())
        self.tokenizer = Tokenizer.load(self.path / "tokenizer.json")
        if self.tokenizer.sha256 != self.meta["tokenizer_sha256"]:
            raise DataError(
                f"{self.path}: tokenizer.json does not match the one the tokens were made with; prepare again"
            )
        dtype = np.dtype(self.meta["dtype"])
        self.splits = {}
        for name in ("train", "val"):
            split = self.meta["splits"][name]
            # format 1: one file a split
            shards = split.get("shards") or [{"file": f"{name}.bin", "tokens": split["tokens"]}]
            parts = []
            for sh in shards:
                f = self.path / sh["file"]
                if sh["tokens"] and (not f.is_file() or f.stat().st_size != sh["tokens"] * dtype.itemsize):
                    raise DataError(
                        f"{f} is missing or has the wrong size for {sh['tokens']:,} tokens; prepare the data again"
                    )
                parts.append(
                    np.memmap(f, dtype=dtype, mode="r", shape=(sh["tokens"],)) if sh["tokens"] else np.zeros(0, dtype)
                )
            self.splits[name] = Tokens(parts, dtype)

    def tokens(self, split: str) -> Tokens:
        return self.splits[split]

    @property
    def identity(self) -> str:
        """A content hash of the data a run trains on: the tokenizer and the token ids of both splits. A run
        records it, so a resume finds its own tokens again wherever they are cached, and never trains on
        other ones by mistake."""
        h = hashlib.sha256(self.meta["tokenizer_sha256"].encode())
        for name in ("train", "val"):
            split = self.meta["splits"][name]
            if split.get("shards"):
                digest = "+".join(sh["sha256"] for sh in split["shards"])
            else:  # format 1: one file a split, no hash recorded
                digest = hashlib.sha256(np.asarray(self.splits[name]).tobytes()).hexdigest()
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
            raise DataError(
                f"only {len(tokens)} training tokens, fewer than the context window + 1 ({block + 1}); lower "
                "--block-size or add text"
            )
        self.tokens, self.block = tokens, block
        self.gen = torch.Generator().manual_seed(seed)

    def next(self, batch: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch's windows rank, rank + world, ...: every rank draws the same offsets (the generator
        stays in step) and reads only its own windows."""
        starts = torch.randint(0, len(self.tokens) - self.block, (batch,), generator=self.gen)
        self.last_rows = batch
        return windows(self.tokens, starts[rank::world], self.block)

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
            raise DataError(
                f"only {len(tokens)} training tokens, fewer than the context window + 1 ({block + 1}); lower "
                "--block-size or add text"
            )
        self.tokens, self.block, self.seed = tokens, block, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n_windows, generator=torch.Generator().manual_seed(self.seed + epoch))

    def order(self, epoch: int) -> list[int]:
        """Window indices in the order epoch `epoch` visits them."""
        return self._perm(epoch).tolist()

    def next(self, batch: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The next windows of the epoch's order; of a global batch, rank reads windows rank, rank + world, ..."""
        idx = self._order[self.pos : self.pos + batch]
        self.pos += len(idx)
        self.last_rows = len(idx)
        x, y = windows(self.tokens, (idx[rank::world] * self.block).tolist(), self.block)
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


# ---- training data: prepared once, cached
# --------------------------------------------------------------------------------------------


def _source_key(sources: list[str], extra: dict) -> str:
    """Cache key of raw text: paths, sizes and modification times of every file, plus the settings."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for f in source_files(sources):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def source_bytes(data: str) -> int:
    """Size on disk of the raw text a --data source names (compressed files count as stored)."""
    return sum(f.stat().st_size for f in source_files([data]))


def is_prepared(data: str) -> bool:
    """Whether --data names a `gradlm prepare` directory (tokens and tokenizer already made)."""
    p = Path(data)
    return p.is_dir() and (p / "meta.json").is_file()


def find_prepared(identity: str, hint: str | os.PathLike | None = None) -> TokenData | None:
    """The prepared data with this identity (see TokenData.identity): at hint (the folder a run recorded)
    or anywhere in the cache of prepared text; None if there is none. Reads no raw text, so it works offline."""
    hinted = Path(hint) if hint else None
    cache = cache_dir() / "prepared"
    places = ([hinted] if hinted else []) + (
        sorted(p for p in cache.iterdir() if p != hinted) if cache.is_dir() else []
    )
    for p in places:
        if not (p / "meta.json").is_file():
            continue
        try:
            data = TokenData(p)
            # elsewhere in the cache only folders that carry their hashes are looked at (no hashing of every folder)
            hashed = all(s.get("shards") for s in data.meta["splits"].values())
            if (p == hinted or hashed) and data.identity == identity:
                return data
        except (DataError, OSError, ValueError, KeyError, json.JSONDecodeError):
            continue  # a folder left half-made or corrupt is not ours
    return None


def resolve_data(
    cfg,
    tokenizer: Tokenizer | None = None,
    log=print,
    trained_here: bool | None = None,
    identity: str = "",
    hint: str = "",
) -> TokenData:
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
    elif hint and is_prepared(hint):  # a run from before identities were recorded: the folder it trained on
        data = TokenData(hint)
        if tokenizer is not None and data.tokenizer.sha256 == tokenizer.sha256:
            return data
    data = _resolve_data(cfg, tokenizer, log, trained_here)
    if identity and data.identity != identity:
        raise DataError(
            f"--data {cfg.data} no longer gives the tokens this run trained on (identity {data.identity}, the run "
            f"recorded {identity}); "
            "restore the original text or prepared folder, or start a new run from this one with --init"
        )
    return data


def _resolve_data(cfg, tokenizer: Tokenizer | None, log, trained_here: bool | None) -> TokenData:
    if is_prepared(cfg.data):
        return TokenData(Path(cfg.data))
    sources = [cfg.data]
    trained_here = tokenizer is None if trained_here is None else trained_here
    tok_key = "trained" if trained_here else tokenizer.sha256
    sample = parse_size(cfg.tokenizer_sample, "--tokenizer-sample")
    key = _source_key(
        sources,
        {
            "vocab": cfg.vocab_size,
            "val": cfg.val_fraction,
            "field": cfg.text_field,
            "tok": tok_key,
            "errors": cfg.encoding_errors,
            "sample": sample,
            "format": 2,
        },
    )
    cached = cache_dir() / "prepared" / key
    if (cached / "meta.json").is_file():
        data = TokenData(cached)
        if tokenizer is None or data.tokenizer.sha256 == tokenizer.sha256:
            return data
    if cached.exists() and not (cached / "progress.json").is_file():  # left by a crash before any shard: start over
        shutil.rmtree(cached)
    if tokenizer is None:
        tokenizer = train_tokenizer(sources, cfg.vocab_size, sample, cfg.text_field, cfg.encoding_errors, log)
    t0 = time.time()
    meta = prepare(
        sources,
        tokenizer,
        cached,
        cfg.val_fraction,
        seed=0,
        text_field=cfg.text_field,
        progress=cfg.progress and sys.stderr.isatty(),
        errors=cfg.encoding_errors,
        log=log,
    )
    log(
        f"tokenised {meta['splits']['train']['tokens']:,} train + {meta['splits']['val']['tokens']:,} val tokens in "
        f"{time.time() - t0:.1f}s (cached in {cached})"
    )
    return TokenData(cached)
