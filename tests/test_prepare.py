"""Your whole corpus: streamed reading (formats, bad bytes), sharded and resumable prepare, training from
shards, a bounded tokenizer sample, and each DDP rank reading only its own rows."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlm.text.corpus import ReadStats, iter_documents
from gradlm.text.data import EpochSampler, RandomSampler, TokenData, Tokens, windows
from gradlm.text.prepare import train_tokenizer
from gradlm.errors import DataError
from gradlm.text.prepare import _Stop, prepare


@pytest.fixture
def corpus_dir(tmp_path, small_text):
    """Twelve files of Shakespeare, in four formats: enough documents for a document split."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    d = tmp_path / "corpus"
    d.mkdir()
    pieces = [small_text[i * 5000 : (i + 1) * 5000] for i in range(12)]
    for i, p in enumerate(pieces[:6]):
        (d / f"plain{i}.txt").write_text(p)
    with gzip.open(d / "g.txt.gz", "wt", encoding="utf-8") as f:
        f.write(pieces[6])
    lines = "".join(json.dumps({"text": p}) + "\n" for p in pieces[7:9])
    (d / "z.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"text": pieces[9:12], "id": [1, 2, 3]}), d / "p.parquet")
    return d, pieces


def test_every_format_is_read_as_its_documents(corpus_dir):
    d, pieces = corpus_dir
    docs = list(iter_documents(str(d)))
    assert sorted(doc.text for doc in docs) == sorted(pieces)
    assert sum(doc.record for doc in docs) == 5  # 2 jsonl lines + 3 Parquet rows; the 7 files are whole documents


def test_the_prepared_tokens_are_the_documents_ids_across_shards(corpus_dir, tok, tmp_path):
    d, pieces = corpus_dir
    meta = prepare(str(d), tok, tmp_path / "out", val_fraction=0.2, progress=False, workers=2, shard_tokens=1000)
    data = TokenData(tmp_path / "out")
    assert len(meta["splits"]["train"]["shards"]) > 3  # many shards ...
    texts = []
    for split in ("train", "val"):
        ids = data.tokens(split).tolist()
        assert ids[0] == tok.eot_id
        texts += [t for t in tok.decode(ids).split("<|endoftext|>") if t]
    assert sorted(texts) == sorted(pieces)  # ... that hold every document exactly once
    one = prepare(str(d), tok, tmp_path / "one", val_fraction=0.2, progress=False, workers=1)
    assert len(one["splits"]["train"]["shards"]) == 1
    a, b = data.tokens("train"), TokenData(tmp_path / "one").tokens("train")
    assert len(a) == len(b) and a.tolist() == b.tolist()  # sharding changes files, not tokens
    edge = meta["splits"]["train"]["shards"][0]["tokens"] - 5  # a window that spans two shards reads as one
    x, y = windows(a, [edge], 32)
    assert x[0].tolist() == b[edge : edge + 32].tolist() and y[0].tolist() == b[edge + 1 : edge + 33].tolist()


def test_a_killed_prepare_resumes_to_the_same_shards(corpus_dir, tok, tmp_path):
    d, _ = corpus_dir
    full = prepare(str(d), tok, tmp_path / "full", val_fraction=0.2, progress=False, workers=2, shard_tokens=700)
    with pytest.raises(_Stop):  # killed right after its 4th shard
        prepare(
            str(d),
            tok,
            tmp_path / "part",
            val_fraction=0.2,
            progress=False,
            workers=2,
            shard_tokens=700,
            stop_after_shards=4,
        )
    assert (tmp_path / "part" / "progress.json").is_file() and not (tmp_path / "part" / "meta.json").exists()
    (tmp_path / "part" / ".train-00009.bin.x.tmp").write_bytes(b"half")  # what a kill -9 mid-write leaves
    again = prepare(str(d), tok, tmp_path / "part", val_fraction=0.2, progress=False, workers=2, shard_tokens=700)
    assert again["splits"] == full["splits"]  # same shards, same hashes, same counts
    for s in full["splits"].values():
        for sh in s["shards"]:
            assert (tmp_path / "part" / sh["file"]).read_bytes() == (tmp_path / "full" / sh["file"]).read_bytes()
    assert not list((tmp_path / "part").glob("*.tmp")) and not (tmp_path / "part" / "progress.json").exists()
    with pytest.raises(DataError, match="already holds prepared data"):
        prepare(str(d), tok, tmp_path / "part", progress=False)


@pytest.mark.parametrize("policy", ["strict", "replace", "skip"])
def test_bytes_that_are_not_utf8_follow_the_policy(tmp_path, tok, small_text, policy):
    d = tmp_path / "c"
    d.mkdir()
    for i in range(4):
        (d / f"ok{i}.txt").write_text(small_text[i * 3000 : (i + 1) * 3000])
    (d / "bad.txt").write_bytes(b"caf\xe9 au lait\n" * 3)
    if policy == "strict":
        with pytest.raises(DataError, match=r"bad.txt is not valid UTF-8 \(bad byte 0xe9 at offset 3\)"):
            prepare(str(d), tok, tmp_path / "out", progress=False, errors=policy)
        assert not (tmp_path / "out").exists()
        return
    meta = prepare(str(d), tok, tmp_path / "out", progress=False, errors=policy)
    text = "".join(tok.decode(TokenData(tmp_path / "out").tokens(s).tolist()) for s in ("train", "val"))
    if policy == "replace":
        assert meta["replaced_characters"] == 3 and meta["skipped_documents"] == 0 and "caf\ufffd au lait" in text
    else:
        assert meta["replaced_characters"] == 0 and meta["skipped_documents"] == 1 and "au lait" not in text
    assert meta["documents"] == 5 - (policy == "skip")


def test_jsonl_lines_follow_the_policy_one_by_one(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n{"text": "also fine"}\n')
    stats = ReadStats()
    assert [doc.text for doc in iter_documents(str(p), errors="skip", stats=stats)] == [
        "fine",
        "also fine",
    ] and stats.skipped == 1
    assert [doc.text for doc in iter_documents(str(p), errors="replace")][1] == "caf\ufffd"
    with pytest.raises(DataError, match="x.jsonl is not valid UTF-8"):
        list(iter_documents(str(p), errors="strict"))


def test_a_large_file_is_read_in_blocks_and_tokenised_as_a_whole(tmp_path, tok, corpus, monkeypatch):
    from gradlm.text import corpus as corpus_module

    monkeypatch.setattr(corpus_module, "BLOCK_BYTES", 10_007)  # blocks that cut words and lines anywhere
    text = corpus[:200_000]
    (tmp_path / "big.txt").write_text(text)
    doc = next(iter_documents(str(tmp_path / "big.txt")))
    assert not isinstance(doc.parts, list)  # a stream of blocks, not one string
    prepare(str(tmp_path / "big.txt"), tok, tmp_path / "out", val_fraction=0.1, progress=False, workers=1)
    data = TokenData(tmp_path / "out")
    train, val = data.tokens("train").tolist(), data.tokens("val").tolist()
    assert tok.decode(train[1:]) + tok.decode(val[1:]) == text  # head + tail: the whole file
    assert train[1:] == tok.encode(tok.decode(train[1:]))  # exactly the ids of the head as one text
    assert 0.08 < len(tok.decode(val[1:]).encode()) / len(text.encode()) < 0.12


def test_the_tokenizer_learns_from_a_bounded_sample_and_says_so(tmp_path, corpus):
    from gradlm.text.prepare import tokenizer_sample

    text = corpus[:1_000_000]
    (tmp_path / "t.txt").write_text(text)
    pieces, seen = tokenizer_sample(str(tmp_path / "t.txt"), 200_000, seed=0)
    taken = sum(len(p.encode()) for p in pieces)
    # bounded by the budget, not the corpus
    assert seen == len(text.encode()) and 0.3 * 200_000 < taken <= 1.2 * 200_000
    where = [text.index(p) / len(text) for p in pieces]
    assert min(where) < 0.33 and max(where) > 0.66  # drawn across the whole file, not its start
    said = []
    tok = train_tokenizer(str(tmp_path / "t.txt"), 400, sample=200_000, log=said.append)
    assert tok.vocab_size == 406 and "kB of 976.6 kB of text" in said[0] and "a seeded sample" in said[0]


def test_each_rank_reads_only_its_rows_and_together_they_are_the_batch():
    tokens = Tokens([np.arange(0, 3000, dtype=np.uint16), np.arange(3000, 5000, dtype=np.uint16)], np.uint16)
    for cls in (RandomSampler, EpochSampler):
        whole = cls(tokens, 16, 7).next(8)[0]
        ranks = [cls(tokens, 16, 7).next(8, r, 4)[0] for r in range(4)]
        assert all(len(x) == 2 for x in ranks)
        merged = torch.stack([ranks[i % 4][i // 4] for i in range(8)])
        assert torch.equal(merged, whole)


def test_shards_of_a_split_read_as_one_sequence():
    parts = [np.arange(0, 10, dtype=np.uint16), np.arange(10, 13, dtype=np.uint16), np.arange(13, 30, dtype=np.uint16)]
    t, whole = Tokens(parts, np.uint16), np.arange(30, dtype=np.uint16)
    assert len(t) == 30 and t[12] == 12 and t[-1] == 29
    for a, b in ((0, 30), (8, 15), (10, 13), (12, 12), (29, 30), (5, 100)):
        assert t[a:b].tolist() == whole[a:b].tolist()


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:  # it ended meanwhile
        return b""


def test_prepare_killed_at_a_random_moment_resumes_to_the_same_shards(tmp_path, tok, corpus):
    """SIGKILL mid-run (mid-shard, mid-write, whatever comes), then the same command again: the shards equal
    an uninterrupted prepare's, byte for byte."""
    import random
    import subprocess
    import sys
    import time

    d = tmp_path / "c"
    d.mkdir()
    for i in range(40):
        (d / f"f{i:02d}.txt").write_text(corpus[i * 25_000 : (i + 1) * 25_000])
    tok.save(tmp_path / "tok.json")

    def cmd(out):
        return [
            sys.executable,
            "-m",
            "gradlm",
            "prepare",
            "--data",
            str(d),
            "--tokenizer",
            str(tmp_path / "tok.json"),
            "--out",
            str(out),
            "--shard-tokens",
            "3000",
            "--workers",
            "2",
        ]

    assert subprocess.run(cmd(tmp_path / "full"), capture_output=True, text=True, timeout=300).returncode == 0
    rng, kills = random.Random(3), []
    for attempt in range(3):  # kill at a seeded random moment after the first shards, then resume
        p = subprocess.Popen(cmd(tmp_path / "part"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.time() + 120
        while (
            time.time() < end
            and len(list((tmp_path / "part").glob("train-*.bin"))) < 3 * (attempt + 1)
            and p.poll() is None
        ):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.2))
        p.kill()
        p.wait()
        if (tmp_path / "part" / "meta.json").is_file():
            break
        kills.append(len(list((tmp_path / "part").glob("train-*.bin"))))
    r = subprocess.run(cmd(tmp_path / "part"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    full, part = (json.loads((tmp_path / x / "meta.json").read_text()) for x in ("full", "part"))
    # killed at least once mid-run
    assert kills and part["splits"] == full["splits"] and len(full["splits"]["train"]["shards"]) > 10, kills
    names = sorted(p.name for p in (tmp_path / "part").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "full").iterdir())  # no stray temporary files either
    if Path("/proc").is_dir():  # and no worker outlived its killed prepare (Linux: they die with it)
        time.sleep(1)
        mine = str(tmp_path / "part").encode()
        left = [q for q in Path("/proc").iterdir() if q.name.isdigit() and mine in _cmdline(q)]
        assert not left, [_cmdline(q) for q in left]
