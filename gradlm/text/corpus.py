"""Reading a corpus as a stream of documents, in memory bounded by a block, not by the corpus.

Formats (by file name; a directory is read recursively in sorted order):
    .txt .md .text, or any other suffix   one document per file, UTF-8 text
    .jsonl .ndjson                        one document per line: the string field --text-field
    .parquet                              one document per row: the string column --text-field (pyarrow)
    .gz on any of those, .zst on .jsonl   decompressed as they are read

A text file is read in blocks (BLOCK_BYTES) and handed on as a document whose `parts` are those blocks, so a
2 GB file never becomes one 2 GB string. Bytes that are not UTF-8 follow a policy (`errors`): strict stops with
the file and byte offset, replace puts U+FFFD in place of each bad sequence (counted), skip drops the document
(counted). A file with NUL bytes near its start is binary: an error under strict and replace, skipped under skip.

    >>> stats = ReadStats()
    >>> for doc in iter_documents(["notes/", "more.jsonl.zst"], errors="replace", stats=stats):
    ...     for part in doc.parts: ...
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gradlm.text import datasets
from gradlm.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
BLOCK_BYTES = 4 << 20  # a large text file is read and tokenised in blocks of this many bytes
ENCODING_ERRORS = ("strict", "replace", "skip")
DEFAULT_ERRORS = "replace"


@dataclass
class StreamedDocument:
    """One document: where it came from, its text as consecutive parts (one for a record, blocks for a
    large file), and its size in bytes on disk when known before reading (plain files)."""

    source: str
    parts: list[str] | Iterator[str]
    nbytes: int = -1  # bytes of a plain file, known before reading; -1 for records and compressed files
    record: bool = False  # a .jsonl line or Parquet row (split by a hash of where it is), not a whole file

    @property
    def text(self) -> str:
        """The whole text (joins the parts: for small documents)."""
        if not isinstance(self.parts, list):
            self.parts = list(self.parts)
        return "".join(self.parts)


@dataclass
class ReadStats:
    """What the reading met: documents read and skipped, characters replaced, and where (first few)."""

    documents: int = 0
    skipped: int = 0
    replaced: int = 0
    where: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.where) < 5:
            self.where.append(text)

    def summary(self) -> str:
        if not (self.skipped or self.replaced):
            return ""
        return (
            f"{self.replaced:,} undecodable byte sequences replaced by U+FFFD, {self.skipped:,} documents skipped "
            f"(e.g. {'; '.join(self.where)})"
        )


def kind(path: Path) -> tuple[str, str]:
    """(format, compression) from the file name: format 'text' | 'jsonl' | 'parquet' | '' (unknown suffix,
    read as text), compression '' | 'gz' | 'zst'."""
    name = path.name.lower()
    comp = ""
    for c in ("gz", "zst"):
        if name.endswith("." + c):
            comp, name = c, name[: -len(c) - 1]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", comp
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet", comp
    if name.endswith(TEXT_SUFFIXES):
        return "text", comp
    return "", comp


def locate(src: str) -> Path:
    """The path a --data source names: an existing file/directory, or a registered corpus (fetched)."""
    path = Path(src)
    if path.exists():
        return path
    if src in datasets.REGISTRY:
        return datasets.resolve(src)
    raise DataError(f"no such file or directory: {src} (registered datasets: {', '.join(sorted(datasets.REGISTRY))})")


def source_files(sources: Iterable[str]) -> list[Path]:
    """Every file the sources name, in reading order: a directory's files with a known suffix, sorted."""
    files: list[Path] = []
    for src in sources:
        path = locate(src)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and kind(p)[0])
            if not found:
                raise DataError(f"{path} holds no .txt, .md, .jsonl, .parquet, .gz or .zst files")
            files += found
        elif not path.is_file():
            raise DataError(f"no such file: {path}")
        else:
            files.append(path)
    return files


def _open(path: Path, comp: str):
    """A binary stream of the file's decompressed bytes."""
    if comp == "gz":
        return gzip.open(path, "rb")
    if comp == "zst":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise DataError(f"{path} is zstd-compressed: pip install zstandard (or the [data] extra)") from None
        return io.BufferedReader(_Zstd(path))
    return open(path, "rb")


class _Zstd(io.RawIOBase):
    """A zstandard file's decompressed bytes, frame after frame, that notices a file cut short mid-frame
    (zstandard's own stream_reader ends quietly there, and a truncated corpus read as a shorter one)."""

    def __init__(self, path: Path):
        import zstandard

        self.zstd, self.f = zstandard, open(path, "rb")
        self.d, self.out, self.pending, self.in_frame = self.zstd.ZstdDecompressor().decompressobj(), b"", b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.out:
            chunk, self.pending = (self.pending, b"") if self.pending else (self.f.read(1 << 20), b"")
            if not chunk:
                if self.in_frame:
                    raise EOFError("the file ends in the middle of a zstandard frame (it was cut short)")
                return 0
            if self.d.eof:  # the previous frame ended: the next one starts here
                self.d = self.zstd.ZstdDecompressor().decompressobj()
            self.out, self.in_frame = self.d.decompress(chunk), True
            if self.d.eof:
                self.pending, self.in_frame = self.d.unused_data, False
        n = min(len(buffer), len(self.out))
        buffer[:n], self.out = self.out[:n], self.out[n:]
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def _damage() -> tuple[type[BaseException], ...]:
    """What reading a damaged file raises: OS errors, a stream cut short, and the decompression and Parquet
    libraries' own error types (only a library already imported can have raised)."""
    types: list[type[BaseException]] = [OSError, EOFError, zlib.error]
    if zstd := sys.modules.get("zstandard"):
        types.append(zstd.ZstdError)
    if arrow := sys.modules.get("pyarrow"):
        types.append(arrow.ArrowException)
    return tuple(types)


def damaged(path: Path, e: BaseException, where: str = "") -> DataError:
    """One message for a file that cannot be read to its end: which file, where it broke (where is " at ..."
    when known), what the reader said, and what to do."""
    fmt, comp = kind(Path(path))
    reason = " ".join(str(e).split()) or type(e).__name__  # on one line: pyarrow's messages span several
    if isinstance(e, OSError) and not comp and fmt != "parquet" and not isinstance(e, EOFError):
        return DataError(f"cannot read {path}{where}: {e.strerror or reason}; check the file and its permissions")
    test = {"gz": f"`gzip -t {path}`", "zst": f"`zstd -t {path}`"}.get(comp, "")
    return DataError(
        f"{path} is damaged{where}: {reason}; "
        + (f"{test} confirms it; " if test else "")
        + "re-create it from the original, or leave it out of --data"
    )


class _Decoder:
    """Incremental UTF-8 decoding under a policy: strict raises with the byte offset, replace counts."""

    def __init__(self, where: str, errors: str, stats: ReadStats):
        self.where, self.errors, self.stats = where, errors, stats
        self.dec = codecs.getincrementaldecoder("utf-8")("strict" if errors != "replace" else "replace")
        self.offset = 0

    def __call__(self, raw: bytes, final: bool = False) -> str:
        if self.offset == 0 and b"\x00" in raw[:65536]:
            raise _Binary()
        try:
            text = self.dec.decode(raw, final)
        except UnicodeDecodeError as e:
            # e.object is what the decoder held back from the previous block (a cut character) and then raw
            at = self.offset - (len(e.object) - len(raw)) + e.start
            if self.errors == "skip":
                raise _Undecodable(at) from None
            raise DataError(
                f"{self.where} is not valid UTF-8 (bad byte 0x{e.object[e.start]:02x} at offset {at}"
                f"{', where the text ends inside a character' if final and e.end == len(e.object) else ''}); "
                "convert it (e.g. `iconv -f latin1 -t utf-8`), or pass --encoding-errors replace (or skip)"
            ) from None
        if self.errors == "replace":
            n = text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")  # new U+FFFD, not ones the file holds
            if n > 0:
                self.stats.replaced += n
                self.stats.note(f"{self.where} near byte {self.offset}")
        self.offset += len(raw)
        return text


class _Binary(Exception):
    pass


class _Undecodable(Exception):
    def __init__(self, offset: int):
        self.offset = offset


def _binary(path: Path, errors: str, stats: ReadStats) -> None:
    if errors == "skip":
        stats.skipped += 1
        stats.note(f"{path} is binary")
        return
    raise DataError(
        f"{path} looks binary (it contains NUL bytes); gradlm reads UTF-8 text, .jsonl, .parquet and .gz/.zst of those"
    )


def _text_file(path: Path, comp: str, errors: str, stats: ReadStats) -> Iterator[StreamedDocument]:
    """One document of blocks. Under skip, a bad byte found mid-file drops the blocks not yet handed on only:
    so skip decodes the whole file before handing any of it on (one file's text in memory at a time)."""
    # compressed: counted only if a tail split needs it (decompressed_size)
    size = path.stat().st_size if not comp else -1
    decode = _Decoder(str(path), errors, stats)
    f = _open(path, comp)

    def blocks() -> Iterator[str]:
        with f:
            while True:  # blocks cut anywhere: the tokenising side re-cuts the text between pre-tokens
                try:
                    raw = f.read(BLOCK_BYTES)
                except _damage() as e:
                    raise damaged(path, e, _after(decode.offset, comp)) from None
                text = decode(raw, final=not raw)
                if text:
                    yield text
                if not raw:
                    return

    try:
        if errors == "skip":
            parts = list(blocks())
        else:
            first = blocks()
            head = next(first, "")
            parts = _chain(head, first)
    except _Binary:
        f.close()
        return _binary(path, errors, stats)
    except _Undecodable as e:
        stats.skipped += 1
        stats.note(f"{path} (bad byte at offset {e.offset})")
        return
    stats.documents += 1
    yield StreamedDocument(str(path), parts, size)


def decompressed_size(path: Path) -> int:
    """Bytes a (compressed) file holds, counted by reading it through once (in blocks)."""
    n = 0
    try:
        with _open(path, kind(path)[1]) as f:
            while block := f.read(BLOCK_BYTES):
                n += len(block)
    except _damage() as e:
        raise damaged(path, e, _after(n, kind(path)[1])) from None
    return n


def _after(good: int, comp: str) -> str:
    """Where a file that is read in blocks broke: after the bytes read whole (nothing to say before the first)."""
    return f" after {good:,} good bytes{' of decompressed text' if comp else ''}" if good else ""


def _chain(head: str, rest: Iterator[str]) -> Iterator[str]:
    if head:
        yield head
    yield from rest  # a file that breaks later raises there, naming itself (blocks())


def _jsonl(path: Path, comp: str, text_field: str, errors: str, stats: ReadStats) -> Iterator[StreamedDocument]:
    decode = _Decoder(str(path), errors if errors != "skip" else "strict", stats)
    n = 0
    try:
        with _open(path, comp) as f:
            for n, raw in enumerate(f, 1):
                try:  # each line whole (no character spans a \n): the last one, without it, may end inside one
                    line = decode(raw, final=True)
                except _Binary:
                    return _binary(path, errors, stats)
                except DataError:
                    if errors != "skip":
                        raise
                    stats.skipped += 1
                    stats.note(f"{path} line {n} (not UTF-8)")
                    decode = _Decoder(str(path), "strict", stats)
                    continue
                if not line.strip():
                    continue
                obj = _json_line(path, n, line)
                if not isinstance(obj, dict) or text_field not in obj:
                    raise DataError(
                        f"{path} line {n} has no field {text_field!r}; set --text-field to the field that holds the "
                        "text"
                    )
                stats.documents += 1
                yield StreamedDocument(
                    f"{path}:{n}",
                    [_text_value(obj[text_field], path, f"line {n}", "field", text_field)],
                    -1,
                    record=True,
                )
    except _damage() as e:
        raise damaged(path, e, f" at line {n + 1}") from None


def _text_value(value: object, path: Path, where: str, what: str, name: str) -> str:
    """A record's text: a string, in every format (a number, a list or null is the same one error)."""
    if not isinstance(value, str):
        shown = "null" if value is None else type(value).__name__
        raise DataError(
            f"{path} {where}: the {what} {name!r} holds {shown}, not text; set --text-field to the {what} that holds "
            "the text"
        )
    return value


def _parquet(path: Path, text_field: str, stats: ReadStats) -> Iterator[StreamedDocument]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path} is Parquet: pip install pyarrow (or the [data] extra)") from None
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001  (pyarrow raises its own types for a file that is not Parquet)
        raise damaged(path, e) from None
    if text_field not in f.schema_arrow.names:
        raise DataError(
            f"{path} has no column {text_field!r} (columns: {', '.join(f.schema_arrow.names)}); set --text-field"
        )
    row = 0
    batches = f.iter_batches(columns=[text_field], batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
            values = batch.column(0).to_pylist() if batch is not None else []  # a string that is not UTF-8 fails here
        except (*_damage(), UnicodeDecodeError) as e:
            raise damaged(path, e, f" at row {row + 1}") from None
        if batch is None:
            return
        for value in values:
            row += 1
            stats.documents += 1
            yield StreamedDocument(
                f"{path}:row {row}", [_text_value(value, path, f"row {row}", "column", text_field)], -1, record=True
            )


# ---- small inputs, whole: prompts, QA files, chat data, text to evaluate


@dataclass
class Document:
    source: str
    text: str


def read_text(path: Path, errors: str = "strict") -> str:
    """A file's whole text (gunzipped / unzstd'ed by its suffix), with one clear error for a missing,
    unreadable, binary or (under strict) non-UTF-8 file: for inputs that are small by nature."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    try:
        with _open(path, kind(path)[1]) as f:
            raw = f.read()
    except _damage() as e:
        raise damaged(path, e) from None
    try:
        return _Decoder(str(path), errors, ReadStats())(raw, final=True)
    except _Binary:
        _binary(path, "strict", ReadStats())  # raises


def jsonl_objects(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a .jsonl file (or .jsonl.gz / .zst)."""
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            yield n, _json_line(path, n, line)


def _json_line(path: Path, n: int, line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {n} is not JSON ({e.msg}); each line must be one JSON value") from None


def read_documents(sources: Iterable[str] | str, text_field: str = "text", errors: str = "strict") -> list[Document]:
    """Every document of the sources in memory (small corpora: evaluation text); empty ones dropped."""
    docs = [Document(d.source, d.text) for d in iter_documents(sources, text_field, errors)]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(
            f"no text in {', '.join([sources] if isinstance(sources, str) else list(sources))}: the corpus is empty"
        )
    return docs


# ---- the stream


def iter_documents(
    sources: Iterable[str] | str, text_field: str = "text", errors: str = DEFAULT_ERRORS, stats: ReadStats | None = None
) -> Iterator[StreamedDocument]:
    """Every document of the sources, one at a time (see the module docstring). Empty documents are dropped."""
    if errors not in ENCODING_ERRORS:
        raise DataError(f"--encoding-errors must be one of {', '.join(ENCODING_ERRORS)}, got {errors!r}")
    stats = stats if stats is not None else ReadStats()
    for path in source_files([sources] if isinstance(sources, str) else sources):
        fmt, comp = kind(path)
        if fmt == "jsonl":
            yield from _jsonl(path, comp, text_field, errors, stats)
        elif fmt == "parquet":
            if comp:
                raise DataError(
                    f"{path}: a compressed Parquet file; Parquet compresses itself, so give the .parquet file"
                )
            yield from _parquet(path, text_field, stats)
        else:
            yield from _text_file(path, comp, errors, stats)
