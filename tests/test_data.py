import gzip
import json

import numpy as np
import pytest

from gradlm.text.corpus import read_documents
from gradlm.text.data import EpochSampler, RandomSampler, TokenData
from gradlm.text.prepare import _chunks, choose_val, prepare
from gradlm.errors import DataError


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("First document, plain text.\nWith two lines.\n")
    (d / "sub" / "b.md").write_text("Second document in a subfolder 🙂\n")
    with gzip.open(d / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("Third document, gzipped.\n")
    (d / "d.jsonl").write_text(
        json.dumps({"text": "Fourth, from jsonl."}) + "\n\n" + json.dumps({"text": "Fifth, jsonl too."}) + "\n"
    )
    with gzip.open(d / "e.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "Sixth, gzipped jsonl."}) + "\n")
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    return d


def test_reads_directory_of_mixed_formats(corpus_dir):
    docs = read_documents(str(corpus_dir))
    texts = sorted(d.text.split(",")[0].split(" ")[0] for d in docs)
    assert texts == ["Fifth", "First", "Fourth", "Second", "Sixth", "Third"]


def test_prepare_directory_round_trips(corpus_dir, tok, tmp_path):
    meta = prepare(str(corpus_dir), tok, tmp_path / "out", val_fraction=0.2, progress=False, workers=1)
    data = TokenData(tmp_path / "out")
    assert meta["split"] == "document" and meta["splits"]["val"]["documents"] >= 1
    texts = []
    for split in ("train", "val"):
        ids = data.tokens(split).tolist()
        assert ids[0] == tok.eot_id  # every document starts with <|endoftext|>
        texts += [t for t in tok.decode(ids).split("<|endoftext|>") if t]
    assert sorted(texts) == sorted(d.text for d in read_documents(str(corpus_dir)))
    assert data.tokens("train").dtype == np.uint16
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == sum(
        len(d.text.encode()) for d in read_documents(str(corpus_dir))
    )


def test_single_file_splits_off_its_tail(small_text, tok, tmp_path):
    (tmp_path / "one.txt").write_text(small_text)
    assert choose_val([len(small_text.encode())], 0.1) is None  # one document: no whole-document split
    meta = prepare(str(tmp_path / "one.txt"), tok, tmp_path / "out", val_fraction=0.1, progress=False, workers=1)
    data = TokenData(tmp_path / "out")
    train, val = (tok.decode(data.tokens(s).tolist()[1:]) for s in ("train", "val"))
    assert meta["split"] == "tail" and train + val == small_text
    assert abs(len(val) - 0.1 * len(small_text)) < 0.02 * len(small_text)
    assert train.endswith("\n")


def test_chunked_parallel_tokenisation_equals_whole(tok, corpus, tmp_path, monkeypatch):
    from gradlm.text import prepare as prepare_module

    text = corpus[:300_000]
    pieces = _chunks(text, size=20_000)
    assert len(pieces) > 10 and "".join(pieces) == text
    (tmp_path / "t.txt").write_text(text)
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 20_000)  # many pieces, many tasks, two workers
    prepare(str(tmp_path / "t.txt"), tok, tmp_path / "out", val_fraction=0.0, progress=False, workers=2)
    assert TokenData(tmp_path / "out").tokens("train").tolist() == [tok.eot_id] + tok.encode(text)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"   \n\n", "empty"),
        (b"\x7fELF\x00\x00\x01binary", "binary"),
        (b"caf\xe9 latin-1", "not valid UTF-8"),
    ],
)
def test_bad_corpora_are_rejected_clearly(tmp_path, content, message):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_documents(str(p))


def test_bad_jsonl(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        read_documents(str(p))
    p.write_text('{"body": "ok"}\n')
    with pytest.raises(DataError, match="--text-field"):
        read_documents(str(p))


def test_missing_path():
    with pytest.raises(DataError, match="no such file"):
        read_documents("does/not/exist.txt")


def test_prepare_failure_leaves_nothing(tmp_path, tok):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="bad.txt is not valid UTF-8"):
        prepare(str(p), tok, tmp_path / "out", progress=False, errors="strict")
    assert not (tmp_path / "out").exists()
    assert [x.name for x in tmp_path.iterdir()] == ["bad.txt"]


def test_epoch_sampler_visits_every_window_once_in_seeded_order():
    tokens = np.arange(1001, dtype=np.uint16)
    s = EpochSampler(tokens, block=10, seed=3)
    assert s.n_windows == 100
    seen = []
    while s.epoch == 0:
        x, y = s.next(7)
        assert (y[:, :-1] == x[:, 1:]).all()
        seen += (x[:, 0] // 10).tolist()
    assert seen == EpochSampler(tokens, 10, 3).order(0)
    assert sorted(seen) == list(range(100))
    assert EpochSampler(tokens, 10, 3).order(1) != seen  # a new shuffle each epoch


def test_samplers_resume_exactly():
    tokens = np.arange(5000, dtype=np.uint16)
    for cls in (RandomSampler, EpochSampler):
        a = cls(tokens, 16, 0)
        a.next(4)
        state = a.state_dict()
        expected = a.next(4)[0]
        b = cls(tokens, 16, 0)
        b.load_state_dict(state)
        assert (b.next(4)[0] == expected).all()


def test_document_split_keeps_the_validation_share_near_the_target():
    sizes = [100_000] + [len("note %d " % i * 20) for i in range(200)]
    val = choose_val(sizes, 0.1, seed=0)
    share = sum(sizes[i] for i in val) / sum(sizes)
    assert 0.05 <= share <= 0.15 and 0 not in val  # the big document would overshoot: never held out
    # Two large documents only: whole documents cannot make 10%, so each gives its tail instead.
    assert choose_val([80_000, 80_000], 0.1) is None
