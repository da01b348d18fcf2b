"""Damaged input, in every format gradlm reads: whatever a reader library raises on a damaged file (zlib, gzip,
zstandard, pyarrow, json, UTF-8), `gradlm prepare` says in one line which file and what to do, exits 2 and leaves
nothing behind; or it succeeds, and then its tokens are exactly the text an independent reader gets from the
same bytes. Property-based: hypothesis damages valid files at random places (flipped bytes, cuts, inserted
junk) and the two outcomes must agree with what the reference readers below make of the damaged file."""

from __future__ import annotations

import gzip
import io
import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gradlm.cli import main
from gradlm.text.data import TokenData

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

FORMATS = ["doc.txt", "doc.txt.gz", "rows.jsonl", "rows.jsonl.gz", "rows.jsonl.zst", "rows.parquet"]


def documents(text: str) -> list[str]:
    return [text[i : i + 700] for i in range(0, len(text), 700)]


def encode(name: str, docs: list[str]) -> bytes:
    """A valid file of this format holding docs (one document for plain text, one record each otherwise)."""
    if name.endswith(".parquet"):
        sink = io.BytesIO()
        pq.write_table(pa.table({"text": docs}), sink, compression="snappy", row_group_size=4)
        return sink.getvalue()
    raw = ("".join(docs) if ".txt" in name else "".join(json.dumps({"text": d}) + "\n" for d in docs)).encode()
    if name.endswith(".gz"):
        return gzip.compress(raw, mtime=0)
    if name.endswith(".zst"):
        return zstandard.ZstdCompressor().compress(raw)
    return raw


def reference(name: str, data: bytes) -> list[str] | None:
    """The non-empty documents an independent reader finds in these bytes, or None where it finds them
    unreadable. One-shot library calls, not gradlm's streaming readers."""
    try:
        if name.endswith(".parquet"):
            values = pq.read_table(io.BytesIO(data)).column("text").to_pylist()
            return [v for v in values if v.strip()] if all(isinstance(v, str) for v in values) else None
        if name.endswith(".gz"):
            data = gzip.decompress(data)
        elif name.endswith(".zst"):
            reader = zstandard.ZstdDecompressor().decompressobj()
            out = reader.decompress(data)
            if not reader.eof or reader.unused_data:  # cut short, or more after the frame (junk or a broken one)
                return None
            data = out
        if b"\x00" in data[:65536]:  # a NUL near the start: binary, not text
            return None
        text = data.decode("utf-8")  # strict
        if ".txt" in name:
            return [text] if text.strip() else []
        docs = []
        for line in text.split("\n"):  # (not splitlines: JSON Lines are cut at \n only, \v or \u2028 are not ends)
            if line.strip():
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    return None
                docs.append(obj["text"])
        return [d for d in docs if d.strip()]
    except Exception:  # noqa: BLE001  (whatever the reference library raises: unreadable)
        return None


@pytest.fixture(scope="module")
def valid(small_text) -> dict[str, bytes]:
    docs = documents(small_text[:8000])
    return {name: encode(name, docs) for name in FORMATS}


@pytest.fixture(scope="module")
def tokfile(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(path)
    return path


damage = st.tuples(
    st.sampled_from(["flip", "cut", "insert"]),
    st.floats(0, 1, exclude_max=True),
    st.integers(1, 255),
    st.integers(1, 64),
)


def damaged(data: bytes, how: tuple) -> bytes:
    kind, where, value, length = how
    at = int(where * len(data))
    if kind == "flip":  # one byte changed
        return data[:at] + bytes([data[at] ^ value]) + data[at + 1 :]
    if kind == "cut":  # the file ends early
        return data[:at]
    return data[:at] + bytes((value * (k + 1)) % 256 for k in range(length)) + data[at:]  # junk in the middle


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(FORMATS), how=damage)
@example(name="rows.jsonl", how=("flip", 0.9999999999999999, 204, 1))  # its last \n made a character's first byte
@example(name="rows.jsonl", how=("flip", 0.9999999999999999, 1, 1))  # its last \n made a \v
def test_a_damaged_file_is_one_clear_error_or_exactly_its_readable_text(
    valid, tokfile, tok, tmp_path_factory, capsys, name, how
):
    d = tmp_path_factory.mktemp("damaged")
    data = damaged(valid[name], how)
    (d / name).write_bytes(data)
    want = reference(name, data)
    capsys.readouterr()
    rc = main(
        [
            "prepare",
            "--data",
            str(d / name),
            "--out",
            str(d / "out"),
            "--tokenizer",
            str(tokfile),
            "--workers",
            "1",
            "--val-fraction",
            "0",
            "--encoding-errors",
            "strict",
        ]
    )
    err = capsys.readouterr().err
    if rc == 0:
        assert want, (how, err)  # gradlm read text where the reference finds none, or none it can read
        ids = TokenData(d / "out").tokens("train").tolist()
        got = [t for t in tok.decode(ids).split("<|endoftext|>") if t]
        assert got == want, how  # every document the damaged file still holds, in order, and nothing else
    else:
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (how, err)
        assert name.split(".")[0] in err or "the corpus is empty" in err, err  # it names the file
        assert not want, (how, err)  # an error where the reference reads text: a false alarm
        assert not (d / "out").exists()  # nothing left behind


@pytest.mark.parametrize(
    "name, expect",
    [
        ("doc.txt.gz", "is damaged"),  # CRC mismatch: zlib/gzip's error
        ("rows.jsonl.zst", "is damaged at line 1"),
        ("rows.parquet", "is damaged at row"),
    ],
)
def test_each_reader_library_error_names_the_file(valid, tokfile, tmp_path, capsys, name, expect):
    data = bytearray(valid[name])
    at = 4 if name.endswith(".parquet") else len(data) // 2  # Parquet: its first page header, after the magic bytes
    data[at : at + 40] = bytes(b ^ 0x5A for b in data[at : at + 40])
    (tmp_path / name).write_bytes(bytes(data))
    for argv in (
        ["prepare", "--data", str(tmp_path / name), "--out", str(tmp_path / "out"), "--tokenizer", str(tokfile)],
        [
            "tokenizer",
            "train",
            "--data",
            str(tmp_path / name),
            "--vocab-size",
            "300",
            "--out",
            str(tmp_path / "tok.json"),
        ],
        ["train", "--data", str(tmp_path / name), "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-progress"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / name} {expect}") and err.count("\n") == 1, err
        assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing written


def test_a_file_cut_short_is_never_read_as_a_shorter_corpus(valid, tokfile, tmp_path, capsys):
    """zstandard's own stream reader ends quietly at a cut; gzip's raises: both are errors, naming the file."""
    for name in ("rows.jsonl.zst", "doc.txt.gz"):
        (tmp_path / name).write_bytes(valid[name][: len(valid[name]) * 2 // 3])
        assert (
            main(
                ["prepare", "--data", str(tmp_path / name), "--out", str(tmp_path / "out"), "--tokenizer", str(tokfile)]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert f"{tmp_path / name} is damaged" in err and ("cut short" in err or "end-of-stream" in err), err


def test_text_that_is_not_a_string_is_the_same_error_in_every_format(tmp_path, tokfile, capsys):
    (tmp_path / "n.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
    pq.write_table(pa.table({"text": pa.array([1, 2], pa.int64())}), tmp_path / "n.parquet")
    pq.write_table(pa.table({"text": pa.array(["fine", None], pa.string())}), tmp_path / "null.parquet")
    for name, where, what in (
        ("n.jsonl", "line 2", "int"),
        ("n.parquet", "row 1", "int"),
        ("null.parquet", "row 2", "null"),
    ):
        assert (
            main(
                ["prepare", "--data", str(tmp_path / name), "--out", str(tmp_path / "out"), "--tokenizer", str(tokfile)]
            )
            == 2
        )
        err = capsys.readouterr().err
        kind = "column" if name.endswith(".parquet") else "field"
        assert (
            err == f"error: {tmp_path / name} {where}: the {kind} 'text' holds {what}, not text; "
            f"set --text-field to the {kind} that holds the text\n"
        )
