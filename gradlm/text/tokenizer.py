"""Byte-level BPE: train, encode/decode, special tokens, save/load as tokenizer.json.

Layout of the ids (our convention, so a vocabulary of 256 is exactly "raw bytes"):

    0..255                  the 256 single bytes (id == byte value), so no input ever needs <unk>
    256..256+merges-1       merged tokens, in the order they were learned (id order == merge priority)
    after that              special tokens such as <|endoftext|>, never produced from ordinary text

Training uses Hugging Face `tokenizers` (fast, standard). Encoding uses a `tiktoken` Encoding built from
the same merges when the tokenizer is one of ours (tiktoken is the faster encoder on this machine); HF is
the fallback for imported tokenizers whose pre-tokenizer we do not recognise. A test checks both give
identical ids on the Shakespeare corpus.

Example:
    >>> tok = Tokenizer.train(["hello world, hello there"], vocab_size=260)
    >>> tok.decode(tok.encode("héllo 🙂"))
    'héllo 🙂'
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import tiktoken
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from gradlm.errors import TokenizerError

# The GPT-4 (cl100k) pre-tokenisation pattern: contractions, words with one leading non-letter, numbers
# in groups of at most 3 digits, punctuation runs, newlines, and whitespace. BPE never merges across
# these pieces, which keeps merges meaningful and lets us tokenise chunks of a file independently.
SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

EOT = "<|endoftext|>"
# Reserved at training time so chat fine-tuning later needs no vocabulary surgery.
SPECIAL_TOKENS = (EOT, "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# tokenizer size when none is given (measured best of 512 / 1024 / 2048 on 1 MB: gradlm/training/autosize.py)
DEFAULT_VOCAB = 1024
VOCAB_HELP = (
    f"tokenizer size: 256 bytes + merges (256 = pure bytes); the {len(SPECIAL_TOKENS)} reserved special tokens come "
    "on top, "
    f"so {DEFAULT_VOCAB} gives {DEFAULT_VOCAB + len(SPECIAL_TOKENS)} ids"
)


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """The byte-level alphabet: each byte as one printable unicode character.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are moved to
    code points from 256 up, in byte order. This is the mapping GPT-2 made standard and HF uses.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


@lru_cache(maxsize=1)
def char_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_char().items()}


def piece_to_bytes(piece: str) -> bytes:
    """A byte-level token string (as stored in tokenizer.json) to the raw bytes it stands for."""
    table = char_to_byte()
    return bytes(table[c] for c in piece)


def _hf_merges(model_json: dict) -> list[tuple[str, str]]:
    """Merges from tokenizer.json, in either the old ("a b") or the new (["a", "b"]) format."""
    out = []
    for m in model_json.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        out.append((a, b))
    return out


def _build_hf(vocab: dict[str, int], merges: list[tuple[str, str]], specials: Iterable[str]) -> HFTokenizer:
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return hf


def _read_json_dict(path: Path) -> dict:
    """A JSON object from path, or {} when the file is missing or not a JSON object."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _sidecar_eos(path: Path) -> str:
    """eos_token of an HF tokenizer_config.json (a string or {"content": ...}); EOT when it has none."""
    eos = _read_json_dict(path).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else EOT


class Tokenizer:
    """A byte-level BPE tokenizer backed by an HF `tokenizers.Tokenizer` (and tiktoken when possible)."""

    def __init__(self, hf: HFTokenizer, eos_token: str = EOT):
        """eos_token: the token that ends (and separates) documents. <|endoftext|> in our tokenizers; an
        imported tokenizer may name another one (e.g. "</s>"), which save/load keep in the HF sidecar
        tokenizer_config.json next to tokenizer.json."""
        self.hf = hf
        spec = json.loads(hf.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerError(
                f"unsupported tokenizer model {model.get('type')!r}: gradlm reads byte-level BPE tokenizers only"
            )
        if eos_token != EOT and hf.token_to_id(eos_token) is None:
            raise TokenizerError(f"end-of-text token {eos_token!r} is not in the tokenizer's vocabulary")
        self.eos_token = eos_token
        vocab: dict[str, int] = model["vocab"]
        self.specials: dict[str, int] = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        n = max([*vocab.values(), *self.specials.values()]) + 1
        # Raw bytes of every id; special tokens are stored as their text (they cover no input bytes).
        pieces: list[bytes] = [b""] * n
        try:
            for piece, i in vocab.items():
                pieces[i] = piece_to_bytes(piece)
        except KeyError:
            raise TokenizerError("tokenizer.json is not byte-level (its vocabulary has non-byte symbols)") from None
        for s, i in self.specials.items():
            pieces[i] = s.encode()
        self.pieces = pieces
        self.vocab_size = n
        self._tt = self._tiktoken(vocab, _hf_merges(model), spec.get("pre_tokenizer"))
        # HF always splits out added tokens; for ordinary text (special-token text is just text) use a
        # copy that does not know them.
        self._hf_plain = HFTokenizer.from_str(json.dumps({**spec, "added_tokens": []})) if self._tt is None else None

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        specials: Iterable[str] = SPECIAL_TOKENS,
        show_progress: bool = False,
        length: int | None = None,
    ) -> Tokenizer:
        """Learn vocab_size - 256 merges from texts. vocab_size counts bytes + merges, not specials."""
        if not isinstance(vocab_size, int) or vocab_size < 256:
            raise TokenizerError(
                f"vocab size {vocab_size} is too small: byte-level BPE needs at least the 256 bytes "
                "(use 256 for a pure byte tokenizer, or more to learn merges)"
            )
        specials = list(specials)
        if EOT not in specials:
            specials.insert(0, EOT)
        scratch = HFTokenizer(models.BPE())
        scratch.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            show_progress=show_progress,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        scratch.train_from_iterator(texts, trainer, length=length)
        merges = _hf_merges(json.loads(scratch.to_str())["model"])
        learned = 256 + len(merges)
        if learned < vocab_size:
            raise TokenizerError(
                f"vocab size {vocab_size} is larger than this corpus can support: only {learned - 256} merges "
                f"occur at least twice, so at most {learned} tokens can be learned; lower --vocab-size or add text"
            )
        # Re-number: byte b -> id b, merge k -> id 256 + k (HF numbers its alphabet in another order).
        b2c = byte_to_char()
        vocab = {b2c[b]: b for b in range(256)}
        kept = []
        for a, b in merges:
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
                kept.append((a, b))
        return cls(_build_hf(vocab, kept, specials))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"no tokenizer at {path}: train one with `gradlm tokenizer train` or pass a run directory"
            )
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the HF loader raises plain Exceptions with its parser message
            raise TokenizerError(f"cannot read tokenizer {path}: {e}") from None
        return cls(hf, _sidecar_eos(path.parent / "tokenizer_config.json"))

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically (temp file in the same folder, fsync, rename), plus the
        eos_token in tokenizer_config.json beside it when it is not <|endoftext|>."""
        from gradlm.files import atomic_write_json, atomic_write_text

        path = Path(path)
        atomic_write_text(path, self.to_json())
        sidecar = path.parent / "tokenizer_config.json"
        if self.eos_token != EOT or sidecar.is_file():
            # Record a non-default end-of-text token (and never leave a stale one) where HF keeps it.
            cfg = _read_json_dict(sidecar)
            cfg["eos_token"] = self.eos_token
            atomic_write_json(sidecar, cfg)

    def to_json(self) -> str:
        return self.hf.to_str(pretty=True)

    @property
    def sha256(self) -> str:
        """Identity of the vocabulary and merges (used to check prepared data matches the tokenizer)."""
        data = self.hf.to_str().encode()
        if self.eos_token != EOT:  # it decides the document separators in prepared data
            data += b"\0eos=" + self.eos_token.encode()
        return hashlib.sha256(data).hexdigest()

    def _tiktoken(self, vocab, merges, pre_tokenizer) -> tiktoken.Encoding | None:
        """A tiktoken Encoding equivalent to the HF model, or None when we cannot prove equivalence."""
        if pre_tokenizer != json.loads(_build_hf({}, [], []).to_str())["pre_tokenizer"]:
            return None  # a pre-tokenizer other than ours: keep HF, which implements it exactly
        ranks: dict[bytes, int] = {}
        for piece, i in vocab.items():
            ranks.setdefault(piece_to_bytes(piece), i)
        # tiktoken merges the adjacent pair whose concatenation has the lowest id, so ids of merged
        # tokens must increase in merge order, and every merge must produce a token of the vocabulary.
        last = -1
        for a, b in merges:
            i = vocab.get(a + b)
            if i is None or i <= last:
                return None
            last = i
        if any(bytes([b]) not in ranks for b in range(256)):
            return None  # tiktoken needs every single byte in the vocabulary
        try:
            return tiktoken.Encoding(
                name="gradlm", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=dict(self.specials)
            )
        except Exception:
            return None

    # ---- use ----------------------------------------------------------------------------------------

    @property
    def eot_id(self) -> int:
        """Id of the end-of-text token (eos_token), or -1 if the tokenizer has none."""
        i = self.specials.get(self.eos_token, self.hf.token_to_id(self.eos_token))
        return -1 if i is None else i

    @property
    def backend(self) -> str:
        return "tiktoken" if self._tt is not None else "hf"

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token text in the input is ordinary text unless allow_special is set."""
        if self._tt is not None:
            if allow_special:
                return self._tt.encode(text, allowed_special="all")
            return self._tt.encode_ordinary(text)
        if allow_special:
            return self.hf.encode(text, add_special_tokens=False).ids
        return self._hf_plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._tt is not None:
            # A plain loop: tiktoken's encode_ordinary_batch spends more on its thread pool than on
            # encoding when the texts are short (7x slower on Shakespeare's lines, benchmarks/tokenizer.py).
            return [self._tt.encode_ordinary(t) for t in texts]
        return [self.encode(t) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join(self.pieces[i] for i in ids)
        except IndexError:
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Bytes that do not form valid UTF-8 (a cut multi-byte character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> list[int]:
        """Bytes of input text each id covers (0 for special tokens): the denominator of bits per byte."""
        special = set(self.specials.values())
        return [0 if i in special else len(p) for i, p in enumerate(self.pieces)]

    def __len__(self) -> int:
        return self.vocab_size


class StreamDecoder:
    """Turns ids arriving one at a time into text, holding back bytes of a character cut in two.

    A token can end in the middle of a multi-byte UTF-8 character (emoji often span two tokens);
    printing it then would show U+FFFD. We feed bytes to an incremental UTF-8 decoder instead.
    """

    def __init__(self, tok: Tokenizer):
        import codecs

        self.tok = tok
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(self.tok.pieces[token_id])

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished character are held back."""
        return bool(self._dec.getstate()[0])


def show_token(tok: Tokenizer, token_id: int) -> str:
    """A token for display: its text quoted (' ' spaces stay visible), or its bytes, b'\\xf0\\x9f', when
    it cuts a multi-byte character. The one display of a token: the inspector, logprobs, the server."""
    raw = tok.pieces[token_id]
    try:
        return repr(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(raw)


def describe(tok: Tokenizer, text: str, allow_special: bool = False) -> list[tuple[int, str]]:
    """How text splits: (id, printable piece) per token (see show_token). Special-token text is plain
    text unless allow_special, the same rule as generation."""
    return [(i, show_token(tok, i)) for i in tok.encode(text, allow_special=allow_special)]
