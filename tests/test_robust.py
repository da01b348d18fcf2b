"""Robustness to misspelled words (gradlm/text/augment.py): BPE-dropout segments the same text in many ways and
is the deterministic encoding at 0, typo injection is seeded and keeps its length class, augmented windows
keep their targets on the clean text, resume stays bit-exact, and no tokenizer ever leaves with dropout."""

import json

import numpy as np
import pytest
import regex
import torch
from safetensors.torch import load_file

from gradlm.cli import main
from gradlm.training.config import TrainConfig
from gradlm.text.data import RandomSampler
from gradlm.errors import ConfigError
from gradlm.evaluation.evaluate import EvalConfig, run_eval
from gradlm.text.typos import Typos, inject_typos
from gradlm.text.augment import TRAIN_TYPO_KINDS, RobustSampler, Segmenter, align_typos
from gradlm.evaluation.robustness import typo_splits
from gradlm.text.tokenizer import Tokenizer
from gradlm.training.trainer import Trainer, train

from conftest import tiny_config

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice

LETTERS = regex.compile(r"\p{L}+")  # the words inject_typos edits: runs of letters (str.isalpha)
UNICODE = "naïve café — Ærø 🙂 ÿ\n\n  tabs\tand 123456 numbers, CAPS'll don't \r\n"


@pytest.fixture(scope="module")
def tok1k(corpus) -> Tokenizer:
    return Tokenizer.train([corpus[:300_000]], 1024)


def run_cfg(prepared, tmp_path, name="run", **kw):
    base = dict(
        data=str(prepared),
        out=str(tmp_path / name),
        batch="8",
        max_steps=12,
        eval_every=6,
        eval_tokens=1024,
        warmup_steps=0,
        seed=0,
        progress=False,
        plots=False,
    )
    base.update(kw)
    return TrainConfig(**base)


# ---- BPE-dropout ---------------------------------------------------------------------------------------


def test_dropout_zero_is_the_deterministic_encoding(corpus, tok, tok1k):
    for t in (tok, tok1k):
        seg = Segmenter(t)
        for text in (corpus[:200_000], UNICODE):
            assert seg.encode(text, 0.0) == t.encode(text)


def test_dropout_splits_decode_to_the_same_text_and_vary_with_the_seed(corpus, tok1k):
    seg, text = Segmenter(tok1k), corpus[:20_000] + UNICODE
    plain = tok1k.encode(text)
    runs = {s: seg.encode(text, 0.1, np.random.default_rng(s)) for s in range(4)}
    for ids in runs.values():
        assert tok1k.decode_bytes(ids) == text.encode()
        assert len(plain) < len(ids) < 2 * len(plain)  # finer splits, not bytes
    assert runs[0] == seg.encode(text, 0.1, np.random.default_rng(0))
    assert len({tuple(r) for r in runs.values()}) == 4
    # The higher the dropout, the finer the split; near 1 almost every byte stays alone.
    lengths = [len(seg.encode(text, p, np.random.default_rng(0))) for p in (0.05, 0.3, 0.99)]
    assert lengths == sorted(lengths) and lengths[-1] > 0.9 * len(text.encode())


def test_an_imported_style_tokenizer_is_refused(tok):
    hf_only = Tokenizer(tok.hf)
    hf_only._tt = None  # what an imported tokenizer with a foreign pre-tokenizer gets
    with pytest.raises(ConfigError, match="trained by gradlm"):
        Segmenter(hf_only)


# ---- typos ---------------------------------------------------------------------------------------------


def test_training_typos_are_seeded_and_each_changes_a_word_by_at_most_one_letter(corpus):
    text = corpus[:20_000]
    a, b, c = (inject_typos(text, 0.05, s, TRAIN_TYPO_KINDS) for s in (1, 1, 2))
    assert a == b and a.text != c.text and a.edits > 0
    # The length class: every typo adds (double), removes (drop) or keeps (swap, near key, case) one
    # letter, only inside words; everything else, and the number of words, stays.
    assert abs(len(a.text) - len(text)) <= a.edits
    assert [ch for ch in a.text if not ch.isalpha()] == [ch for ch in text if not ch.isalpha()]
    words, noisy = LETTERS.findall(text), LETTERS.findall(a.text)
    assert len(words) == len(noisy)
    changed = [(w, v) for w, v in zip(words, noisy) if w != v]
    assert sum(abs(len(w) - len(v)) for w, v in changed) <= a.edits
    assert any(w.lower() == v.lower() for w, v in changed)  # the case slips are there too


def test_align_typos_maps_the_unchanged_text_and_the_ends_of_changed_words():
    clean = "the cat sat"
    # 'cat' swapped two letters, 'sat' dropped one
    al = align_typos(clean, Typos("the act sa", 2, 9, ((4, 2, "ac"), (10, 1, ""))))
    m = al.offsets
    assert len(m) == len("the act sa") + 1
    assert m[:5].tolist() == [0, 1, 2, 3, 4]  # "the " is the same, and so is where the word begins
    assert m[5] == -1  # "a|ct": no place in "cat" to line up with
    assert m[6:10].tolist() == [6, 7, 8, 9]  # "t s" lines up again after the common suffix "t"
    assert m[10] == len(clean)  # the end of "sa" is the end of "sat"
    assert al.words.tolist() == [[4, 7], [8, 10]]
    assert al.edits.tolist() == [[4, 6], [10, 10]]  # "ac" before the common "t"; the drop: empty, at the end of "sa"
    u_clean = "café au lait"
    mu = align_typos(u_clean, Typos("cafée au lait", 1, 9, ((3, 1, "ée"),)))
    assert mu.offsets[-1] == len(u_clean.encode()) and mu.offsets[len("cafée ".encode())] == len("café ".encode())
    assert mu.words.tolist() == [[0, 6]] and mu.edits.tolist() == [[5, 6]]


def test_align_typos_finds_every_misspelled_word_and_lines_up_the_rest(corpus):
    clean = corpus[:20_000] + UNICODE * 3
    t = inject_typos(clean, 0.1, 3, TRAIN_TYPO_KINDS)
    al = align_typos(clean, t)

    def nbytes(s):
        return len(s.encode("utf-8"))

    pairs = [(c, n) for c, n in zip(LETTERS.finditer(clean), LETTERS.finditer(t.text)) if c.group() != n.group()]
    assert len(pairs) > 300 and al.words.tolist() == [
        [nbytes(t.text[: n.start()]), nbytes(t.text[: n.end()])] for _, n in pairs
    ]
    # Outside the misspelled words every byte is the clean byte its offset maps to.
    noisy_b, clean_b = t.text.encode(), clean.encode()
    inside = np.zeros(len(noisy_b), dtype=bool)
    for a, b in al.words.tolist():
        inside[a:b] = True
    outside = np.flatnonzero(~inside)
    assert (al.offsets[outside] >= 0).all()
    assert bytes(noisy_b[o] for o in outside) == bytes(clean_b[al.offsets[o]] for o in outside)


# ---- augmented training windows -------------------------------------------------------------------------


def windows_of(tok, text, block=64):
    ids = np.array(
        [tok.eot_id, *tok.encode(text[:30_000]), tok.eot_id, *tok.encode(text[30_000:60_000])], dtype=np.uint16
    )
    return ids, block


def test_dropout_windows_read_the_same_text_with_targets_on_the_deterministic_tokens(corpus, tok1k):
    ids, block = windows_of(tok1k, corpus)
    sampler = RobustSampler(RandomSampler(ids, block, 3), tok1k, 0.2, 0.0, 3, block)
    plain = RandomSampler(ids, block, 3)
    x, y = sampler.next(16)
    xp, yp = plain.next(16)
    assert x.shape == y.shape == (16, block) and not torch.equal(x, xp)
    has_target = 0
    for r in range(16):
        window = [int(xp[r, 0]), *yp[r].tolist()]
        text = tok1k.decode_bytes(window)
        for i in range(block):
            seen = tok1k.decode_bytes(x[r, : i + 1].tolist())
            assert text.startswith(seen)  # the inputs are the window's text, split differently
            if y[r, i] >= 0:  # a target is the deterministic token that begins where the input ends
                assert text.startswith(seen + tok1k.pieces[int(y[r, i])])
                assert int(y[r, i]) in window
                has_target += 1
    assert 0.7 < has_target / y.numel() < 0.99


def test_typo_windows_target_the_clean_tokens_and_the_typo_free_rest_of_misspelled_words(corpus, tok1k):
    ids, block = windows_of(tok1k, corpus)
    sampler = RobustSampler(RandomSampler(ids, block, 5), tok1k, 0.0, 0.1, 5, block)
    x, y = sampler.next(8)
    xp, yp = RandomSampler(ids, block, 5).next(8)
    assert not torch.equal(x, xp)
    pieces = 0
    for r in range(8):
        clean_words = LETTERS.findall(tok1k.decode([int(xp[r, 0]), *yp[r].tolist()]))
        noisy = tok1k.decode(x[r].tolist())
        noisy_words = list(LETTERS.finditer(noisy))
        targets = []
        for i in range(block - 1):
            t = int(y[r, i])
            if t >= 0 and t == int(x[r, i + 1]):
                # Either a clean token or a piece of a misspelled word, the next input: then it holds no typo,
                # it lies in the word's common prefix or common suffix with the clean word.
                s0 = len(tok1k.decode(x[r, : i + 1].tolist()))
                piece = tok1k.pieces[t].decode()
                k = next((k for k, m in enumerate(noisy_words) if m.start() <= s0 and s0 + len(piece) <= m.end()), None)
                if k is not None and noisy_words[k].group() != clean_words[k]:
                    word, at = noisy_words[k].group(), s0 - noisy_words[k].start()
                    # the window may end inside the word: its suffix is unknown
                    cut = noisy_words[k].end() == len(noisy)
                    assert clean_words[k].startswith(word[: at + len(piece)]) or (
                        not cut and clean_words[k].endswith(word[at:])
                    )
                    pieces += 1
                    continue
            targets.append(t)
        targets = [t for t in targets if t >= 0]
        assert len(targets) > 0.6 * block
        # The clean targets in the window's order: two inputs can line up with the same clean place (the
        # end of a misspelled word's common prefix and the start of its common suffix), so a target may
        # repeat; once repeats are dropped they are a subsequence of the clean window.
        it = iter(yp[r].tolist())
        assert all(t in it for k, t in enumerate(targets) if k == 0 or t != targets[k - 1])
    assert pieces > 8


def test_resume_is_bit_identical_with_dropout_and_typos(prepared, tmp_path, tok):
    kw = dict(max_steps=12, eval_every=4, bpe_dropout=0.1, typo_rate=0.05)
    straight = train(tiny_config(tok.vocab_size), run_cfg(prepared, tmp_path, "straight", **kw))
    train(tiny_config(tok.vocab_size), run_cfg(prepared, tmp_path, "split", pause_at=5, **kw))
    second = train(tiny_config(tok.vocab_size), run_cfg(prepared, tmp_path, "split", resume=True, **kw))
    assert second["steps"] == straight["steps"] == 12
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    train(tiny_config(tok.vocab_size), run_cfg(prepared, tmp_path, "plain", max_steps=12, eval_every=4))
    c = load_file(tmp_path / "plain" / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the augmentation did change the training


def test_the_saved_and_exported_tokenizer_has_no_dropout(prepared, tmp_path, tok, small_text):
    train(tiny_config(tok.vocab_size), run_cfg(prepared, tmp_path, "run", max_steps=2, bpe_dropout=0.5))
    saved = json.loads((tmp_path / "run" / "tokenizer.json").read_text())
    assert saved["model"]["dropout"] is None
    loaded = Tokenizer.load(tmp_path / "run")
    assert loaded.sha256 == tok.sha256 and loaded.encode(small_text[:5000]) == tok.encode(small_text[:5000])
    from gradlm.formats.hf import export_hf

    export_hf(tmp_path / "run", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "tokenizer.json").read_text())["model"]["dropout"] is None


def test_bad_augmentation_settings_are_one_clear_error(prepared, tmp_path, tok):
    with pytest.raises(ConfigError, match="--bpe-dropout .* must be in \\[0, 1\\)") as e:
        Trainer(tiny_config(tok.vocab_size), run_cfg(prepared, tmp_path, bpe_dropout=1.0, typo_rate=-0.1)).build()
    assert "--typo-rate" in str(e.value)
    train(tiny_config(tok.vocab_size), run_cfg(prepared, tmp_path, "paused", pause_at=2))
    with pytest.raises(ConfigError, match="--bpe-dropout 0.1 cannot change on --resume"):
        Trainer(
            tiny_config(tok.vocab_size),
            run_cfg(prepared, tmp_path, "paused", resume=True, bpe_dropout=0.1),
            given={"bpe_dropout"},
        ).build()


# ---- measuring: eval --typos per word, tokenize --typos ----------------------------------------------------


def test_eval_typos_says_where_the_extra_bits_go(prepared, tmp_path, tok, small_text):
    train(tiny_config(tok.vocab_size), run_cfg(prepared, tmp_path, "run", max_steps=30, eval_every=30))
    from gradlm.rundir import load_model

    model, t = load_model(tmp_path / "run")
    (tmp_path / "val.txt").write_text(small_text[-6000:])
    r = run_eval(model, t, EvalConfig(data=str(tmp_path / "val.txt"), typos=0.05, seed=2, progress=False))
    w = r["typos"]["words"]
    assert w["misspelled_words"] > 20 and w["tokens_per_word_noisy"] > w["tokens_per_word_clean"]
    total_extra = (
        r["typos"]["noisy"]["loss"] * r["typos"]["noisy"]["tokens"] - r["clean"]["loss"] * r["clean"]["tokens"]
    )
    assert w["extra_bits"] == pytest.approx(total_extra / np.log(2), rel=1e-6)  # every extra bit is accounted for
    assert w["extra_bits_in_misspelled_words"] + w["extra_bits_elsewhere"] == pytest.approx(w["extra_bits"])
    top = w["top"][0]
    assert top["times"] >= 1 and "".join(top["clean_split"]).strip().endswith(top["word"])


def test_tokenize_typos_shows_how_misspellings_resplit(tok, tmp_path, capsys):
    splits = typo_splits(tok, "acetaminophen", 4, seed=0)
    assert len(splits) == 4 and len({s.text for s in splits}) == 4
    assert all(s.text != "acetaminophen" and tok.decode(s.ids) == s.text for s in splits)
    assert typo_splits(tok, "acetaminophen", 4, seed=0) == splits
    tok.save(tmp_path / "tok.json")
    assert (
        main(["tokenize", "acetaminophen", "--tokenizer", str(tmp_path / "tok.json"), "--typos", "3", "--seed", "1"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("->") >= 3 and "tokens" in out


def test_fine_tuning_augments_the_questions_and_leaves_the_replies(tok1k):
    from pathlib import Path

    from gradlm.text.sft import SFTSampler, load_sft, pad_id

    data = load_sft(Path(__file__).resolve().parents[1] / "examples" / "drugqa" / "train.jsonl", tok1k, 128)
    plain = SFTSampler(data.examples, pad_id(tok1k), 0)
    robust = RobustSampler(SFTSampler(data.examples, pad_id(tok1k), 0), tok1k, 0.1, 0.1, 0, 128, context_only=True)
    for _ in range(3):
        (xp, yp), (x, y) = plain.next(16), robust.next(16)
        for r in range(16):
            # the replies, all of them, as they were
            assert [t for t in y[r].tolist() if t >= 0] == [t for t in yp[r].tolist() if t >= 0]
            question = tok1k.decode([t for t in x[r].tolist() if t != pad_id(tok1k)])
            assert question.count("<|user|>") == 1 and question.count("<|assistant|>") == 1
        changed = sum(x[r][x[r] != pad_id(tok1k)].tolist() != xp[r][xp[r] != pad_id(tok1k)].tolist() for r in range(16))
        assert changed > 8  # most questions were misspelled or split differently
