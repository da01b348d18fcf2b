import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from gradlm.errors import TokenizerError
from gradlm.text.tokenizer import EOT, SPECIAL_TOKENS, StreamDecoder, Tokenizer, byte_to_char, describe


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "Acetaminophen, ibuprofen and levothyroxine",  # rare drug names
        "Thsi sentnce has mispeled wrods",
        "emoji 🙂👍🏽🇫🇷 and 日本語 and Ελληνικά",
        "tabs\tand\r\nwindows newlines\n\n\n   trailing   ",
        "<|endoftext|> typed by a user",
        "\x00\x01 control bytes \ufffd",
    ],
)
def test_round_trip_hard_cases(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_special_tokens_are_never_produced_from_ordinary_text(tok):
    ids = tok.encode("a <|endoftext|> b")
    assert tok.eot_id not in ids
    assert tok.eot_id in tok.encode("a <|endoftext|> b", allow_special=True)


def test_layout_bytes_then_merges_then_specials(tok):
    assert tok.vocab_size == 320 + len(SPECIAL_TOKENS)
    assert [tok.pieces[b] for b in range(256)] == [bytes([b]) for b in range(256)]
    assert sorted(tok.specials.values()) == list(range(320, 320 + len(SPECIAL_TOKENS)))
    assert tok.specials[EOT] == tok.eot_id


def test_vocab_256_is_pure_bytes(small_text):
    t = Tokenizer.train([small_text[:5000]], 256)
    text = "héllo 🙂"
    assert t.encode(text) == list(text.encode())


def test_tiktoken_and_hf_give_identical_ids_on_corpus(corpus):
    t = Tokenizer.train([corpus], 2048)
    assert t.backend == "tiktoken"
    fast = t.encode(corpus)
    slow = t.hf.encode(corpus, add_special_tokens=False).ids
    assert fast == slow
    assert t.decode(fast) == corpus


def test_merges_compress(tok, small_text):
    assert len(tok.encode(small_text)) < 0.7 * len(small_text.encode())  # pure bytes would be 1.0


def test_save_load_is_standard_tokenizer_json(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    spec = json.loads(path.read_text())
    assert spec["model"]["type"] == "BPE"
    hf = HFTokenizer.from_file(str(path))  # plain HF tokenizers can read it
    text = "Good morrow, cousin! 🙂"
    again = Tokenizer.load(path)
    assert again.encode(text) == tok.encode(text) == hf.encode(text).ids
    assert hf.decode(hf.encode(text).ids) == text
    assert again.sha256 == tok.sha256


def test_hf_fallback_matches_when_pretokenizer_unknown(tok, small_text):
    spec = json.loads(tok.to_json())
    spec["pre_tokenizer"]["pretokenizers"][1]["trim_offsets"] = not spec["pre_tokenizer"]["pretokenizers"][1].get(
        "trim_offsets", True
    )
    other = Tokenizer(HFTokenizer.from_str(json.dumps(spec)))
    assert other.backend == "hf"
    assert other.encode(small_text[:3000]) == tok.encode(small_text[:3000])
    assert other.encode("x <|endoftext|>") == tok.encode("x <|endoftext|>")


def test_vocab_too_small_or_too_large(small_text):
    with pytest.raises(TokenizerError, match="too small"):
        Tokenizer.train([small_text], 100)
    with pytest.raises(TokenizerError, match="larger than this corpus"):
        Tokenizer.train(["abc abc"], 5000)


def test_stream_decoder_holds_back_cut_characters(tok):
    text = "a🙂b日本"
    dec = StreamDecoder(tok)
    out = [dec.push(i) for i in tok.encode(text)] + [dec.flush()]
    assert "".join(out) == text
    assert "\ufffd" not in "".join(out)


def test_describe_shows_how_a_word_splits(tok):
    pieces = describe(tok, "ibuprofen 🙂")
    assert "".join(tok.decode([i]) for i, _ in pieces if True)  # decodable ids
    joined = b"".join(tok.pieces[i] for i, _ in pieces)
    assert joined == "ibuprofen 🙂".encode()
    assert any(shown.startswith("b'") for _, shown in pieces)  # the emoji is cut into byte pieces


def test_byte_alphabet_is_a_bijection():
    m = byte_to_char()
    assert len(set(m.values())) == 256 and all(not c.isspace() for c in m.values())
