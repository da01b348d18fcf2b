"""The one scorer: training's validation, fine-tuning's validation and `gradlm eval` give the same figure for
the same model, text, windows and dtype; masked targets are left out; the windows split over ranks."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradlm.cli import main
from gradlm.training.config import TrainConfig
from gradlm.training.finetune import FineTuner, FinetuneConfig, finetune
from gradlm.rundir import RunDir
from gradlm.model.scoring import score, sliding_windows, spaced_windows, window_plan
from gradlm.text.sft import collate
from gradlm.training.trainer import Trainer, train

from conftest import sharp_model, tiny_config

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice

BLOCK = 32


def cfg(data, out, **kw) -> TrainConfig:
    base = dict(
        data=str(data),
        out=str(out),
        batch="8",
        max_steps=3,
        eval_every=10,
        eval_tokens=1 << 20,
        warmup_steps=0,
        seed=0,
        progress=False,
        plots=False,
        dtype="float32",
        vocab_size=300,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def base(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("base") / "run"
    train(tiny_config(300, block_size=BLOCK), cfg(text_file, out))
    return out


@pytest.fixture(scope="module")
def two_files(tmp_path_factory, small_text, base):
    """A corpus of two documents, the smaller held out whole for validation, cut so that its tokens
    (<|endoftext|> + the text, in the base run's tokenizer) make whole windows of BLOCK: training's
    windows are then every window of it."""
    tok = RunDir(base).load_tokenizer()
    d = tmp_path_factory.mktemp("two") / "data"
    d.mkdir()
    (d / "a_train.txt").write_text(small_text[:50_000], encoding="utf-8")
    val = small_text[50_000:55_000]
    while len(tok.encode(val)) % BLOCK:
        val = val[:-1]
    (d / "b_val.txt").write_text(val, encoding="utf-8")
    return d, val


def test_training_finetuning_and_eval_print_the_same_validation_figure(base, two_files, tmp_path, capsys):
    data, val = two_files
    # the base's weights, not trained further
    t = Trainer(tiny_config(300), cfg(data, tmp_path / "t", init=str(base))).build()
    tok = RunDir(base).load_tokenizer()
    assert t.tok.sha256 == tok.sha256
    assert t.source.val_tokens.tolist() == [tok.eot_id] + tok.encode(val)  # the held-out document, whole windows of it
    trained = t.evaluate()
    # text: scored as pretraining scores it
    tuned = FineTuner(str(base), FinetuneConfig(), cfg(data, tmp_path / "f")).build().evaluate()
    main(["eval", str(base), "--data", str(data / "b_val.txt"), "--stride", str(BLOCK), "--json"])
    evaluated = json.loads(capsys.readouterr().out)["clean"]
    assert (
        evaluated["windows"] == len(t.source.val_tokens) // BLOCK
        and evaluated["tokens"] == len(t.source.val_tokens) - 1
    )
    assert trained["val_bpb"] == pytest.approx(evaluated["bits_per_byte"], abs=1e-6)
    assert trained["val_loss"] == pytest.approx(evaluated["loss"], abs=1e-6)
    assert tuned["val_bpb"] == pytest.approx(trained["val_bpb"], abs=1e-9) and tuned["val_loss"] == pytest.approx(
        trained["val_loss"], abs=1e-9
    )


def test_finetuning_validation_scores_the_replies_only(base, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is item {i}?"},
                {"role": "assistant", "content": f"It is number {i * 7}."},
            ]
        }
        for i in range(40)
    ]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    t = FineTuner(str(base), FinetuneConfig(), cfg(qa, tmp_path / "ft", val_fraction=0.25, micro_batch=3)).build()
    got = t.evaluate()
    # by hand: log-softmax at every reply token (and <|end|>) of each held-out conversation, one at a time
    lengths = torch.tensor(t.tok.token_byte_lengths())
    nll = bits = nbytes = n = 0.0
    with torch.no_grad():
        for e in t.source.val_examples:
            x, y = collate([e], t.source.pad)
            logp = F.log_softmax(t.model(x).float(), -1)[0]
            for pos, target in enumerate(y[0].tolist()):
                if target >= 0:
                    loss = -float(logp[pos, target])
                    nll, n = nll + loss, n + 1
                    if lengths[target] > 0:
                        bits, nbytes = bits + loss / math.log(2), nbytes + int(lengths[target])
    assert (
        n > 0
        and got["val_loss"] == pytest.approx(nll / n, rel=1e-6)
        and got["val_bpb"] == pytest.approx(bits / nbytes, rel=1e-6)
    )


def test_spaced_windows_split_over_ranks_into_the_same_figure(tok):
    model = sharp_model(tok.vocab_size)
    tokens = np.array(tok.encode("It was the best of times, it was the worst of times. " * 40))
    lengths = torch.tensor(tok.token_byte_lengths())
    whole = score(model, spaced_windows(tokens, 32, 10 * 32, 4), lengths)
    parts = [score(model, spaced_windows(tokens, 32, 10 * 32, 4, rank, 3), lengths) for rank in range(3)]
    assert whole.tokens == 10 * 32 == sum(p.tokens for p in parts)
    # Not to the last bit: a window's float32 logits depend on which windows share its batch where the kernels block
    # by batch size (ATen's AVX2 ones do: 5e-10 apart there), so each token's loss may move by a float32 rounding.
    assert whole.nll == pytest.approx(sum(p.nll for p in parts), rel=1e-6) and whole.bits == pytest.approx(
        sum(p.bits for p in parts), rel=1e-6
    )


def test_masked_targets_are_left_out_and_kept_losses_follow_the_windows(tok):
    model = sharp_model(tok.vocab_size)
    seq = torch.tensor(tok.encode("To be, or not to be, that is the question. " * 6))
    lengths = torch.tensor(tok.token_byte_lengths())
    s = score(model, sliding_windows(seq, 32, 8, 3), lengths, keep=True)
    assert s.tokens == len(seq) - 1 == len(s.per_token) and len(window_plan(len(seq) - 1, 32, 8)) > 3
    x, y = seq[:32].unsqueeze(0), seq[1:33].unsqueeze(0).clone()
    full = score(model, [(x, y)], lengths, keep=True)
    y[0, :20] = -1  # the first 20 targets are not scored: the rest score as before, given the same inputs
    part = score(model, [(x, y)], lengths, keep=True)
    assert part.tokens == 12 and torch.allclose(part.per_token, full.per_token[20:])
    assert score(model, [], lengths).loss != score(model, [], lengths).loss  # nothing scored: NaN, not 0


def test_bfloat16_is_a_named_rule_close_to_float32(tok):
    model = sharp_model(tok.vocab_size)
    seq = torch.tensor(tok.encode("Now is the winter of our discontent made glorious summer. " * 4))
    lengths = torch.tensor(tok.token_byte_lengths())
    f32, bf16 = (score(model, sliding_windows(seq, 32, 32, 4), lengths, dtype) for dtype in ("float32", "bfloat16"))
    assert f32.tokens == bf16.tokens and abs(f32.bits_per_byte - bf16.bits_per_byte) < 0.05 * f32.bits_per_byte
    with pytest.raises(ValueError, match="dtype"):
        score(model, [], lengths, "float16")


def test_finetune_leaves_the_callers_configs_as_they_were(base, two_files, tmp_path):
    data, _ = two_files
    c, ft = cfg(data, tmp_path / "ft", max_steps=2, lr=0.0), FinetuneConfig(method="freeze", train_top=1)
    c0, ft0 = copy.deepcopy(c), copy.deepcopy(ft)
    finetune(str(base), c, ft)
    assert c == c0 and ft == ft0
