"""SFT data: both .jsonl forms read the same, bad lines name their file and line, batches pad with
<|pad|> and target -1 exactly where the loss must not look, long conversations are cut and counted,
and the sampler's order is seeded and resumes exactly."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from gradlm.text.chat import END, encode_for_training
from gradlm.errors import DataError, TokenizerError
from gradlm.text.sft import (
    SFTSampler,
    batches,
    collate,
    is_chat_file,
    load_sft,
    pad_id,
    read_conversations,
    split_examples,
)
from gradlm.text.tokenizer import EOT, Tokenizer

from conftest import generate_ids, sft_fit, tiny_config

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


QA = [
    {"prompt": "What class is zorvastatin?", "completion": "a statin"},
    {
        "messages": [
            {"role": "user", "content": "Max daily dose of quelmaprine?"},
            {"role": "assistant", "content": "25 mg"},
        ],
        "split": "train",
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye."},
        ]
    },
]


def test_prompt_completion_is_one_user_and_one_assistant_turn(tmp_path, tok):
    a = read_conversations(write_jsonl(tmp_path / "a.jsonl", [QA[0]]))[0]
    b = read_conversations(
        write_jsonl(
            tmp_path / "b.jsonl",
            [
                {
                    "messages": [
                        {"role": "user", "content": QA[0]["prompt"]},
                        {"role": "assistant", "content": QA[0]["completion"]},
                    ]
                }
            ],
        )
    )[0]
    assert a.messages == b.messages and a.where == f"{tmp_path / 'a.jsonl'} line 1"
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress((json.dumps(QA[1]) + "\n").encode()))
    c = read_conversations([gz])[0]
    assert c.extra == {"split": "train"} and c.messages[1]["content"] == "25 mg"


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 2 is not JSON"),
        ('"just a string"', "line 2: expected an object"),
        ('{"text": "hello"}', "line 2 has neither"),
        ('{"prompt": "q"}', 'line 2: "prompt" and "completion" must both be strings'),
        ('{"prompt": "q", "completion": 5}', "must both be strings"),
        ('{"messages": [{"role": "user", "content": "q"}], "prompt": "q", "completion": "a"}', "line 2 has both"),
        ('{"messages": [{"role": "robot", "content": "q"}]}', "line 2: message 1 has role 'robot'"),
        ('{"messages": []}', 'line 2: "messages" must be a non-empty list'),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [QA[0], line])
    with pytest.raises(DataError, match=message.replace("(", r"\(")) as e:
        read_conversations(path)
    assert "bad.jsonl" in str(e.value)


def test_a_line_without_a_reply_names_its_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "q.jsonl", [QA[0], {"messages": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(DataError, match="q.jsonl line 2 has no assistant message"):
        load_sft(path, tok, 64)


def test_files_that_are_not_chat_data(tmp_path, tok):
    txt = tmp_path / "notes.txt"
    txt.write_text("plain text")
    with pytest.raises(DataError, match="not .jsonl"):
        read_conversations(txt)
    with pytest.raises(DataError, match="no such file"):
        read_conversations(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="holds no conversations"):
        read_conversations(write_jsonl(tmp_path / "empty.jsonl", []))
    assert not is_chat_file(txt)
    assert not is_chat_file(write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}]))
    assert is_chat_file(write_jsonl(tmp_path / "chat.jsonl", QA))


def test_batches_pad_with_pad_and_target_exactly_the_trained_tokens(tmp_path, tok):
    data = load_sft(write_jsonl(tmp_path / "qa.jsonl", QA), tok, 64)
    pad = pad_id(tok)
    assert pad == tok.specials["<|pad|>"] and pad != tok.specials[END]
    x, y = collate(data.examples, pad)
    lengths = [len(e.ids) - 1 for e in data.examples]
    assert x.shape == y.shape == (3, max(lengths))
    for b, e in enumerate(data.examples):
        n = lengths[b]
        assert x[b, :n].tolist() == e.ids[:-1]
        assert (x[b, n:] == pad).all() and (y[b, n:] == -1).all()  # padding: pad inputs, no targets
        # Targets are the next ids exactly where the chat mask says, -1 everywhere else.
        assert y[b, :n].tolist() == [i if m else -1 for i, m in zip(e.ids[1:], e.mask[1:])]
    assert pad not in y.tolist()[0]
    # The targets are the assistant replies and their ends, nothing else.
    last = data.examples[2]
    assert tok.decode(t for t in y[2].tolist() if t >= 0) == "Hello.<|end|>Bye.<|end|>"
    assert int((y >= 0).sum()) == sum(sum(e.mask) for e in data.examples)
    x8, y8 = collate(data.examples, pad, length=40)
    assert x8.shape == (3, 40) and torch.equal(y8[:, : y.shape[1]], y) and (y8[:, y.shape[1] :] == -1).all()
    assert last.where.endswith("line 3")


def test_padding_changes_no_loss(tmp_path, tok):
    """The same example alone or padded beside a longer one gets the same loss (pads are never attended or scored)."""
    from gradlm.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config(tok.vocab_size, block_size=64)).eval()
    data = load_sft(write_jsonl(tmp_path / "qa.jsonl", QA), tok, 64)
    short = data.examples[0]
    with torch.no_grad():
        alone = model(*collate([short], pad_id(tok)), reduction="none")[0]
        padded = model(*collate([short, data.examples[2]], pad_id(tok)), reduction="none")[0]
    n = len(short.ids) - 1
    assert torch.allclose(alone[:n], padded[:n], atol=1e-6)
    assert float(padded[n:].abs().sum()) == 0.0


def test_long_conversations_are_cut_to_the_window_and_counted(tmp_path, tok):
    long_reply = {"prompt": "Tell me everything.", "completion": "ROMEO and JULIET " * 20}
    long_question = {"prompt": "What light through yonder window breaks? " * 10, "completion": "the east"}
    path = write_jsonl(tmp_path / "long.jsonl", [QA[0], long_reply, long_question])
    block = 40  # QA[0] is 28 tokens; the others are far longer
    data = load_sft(path, tok, block)
    assert (data.truncated, data.dropped, len(data.examples)) == (2, 1, 2)
    assert all(len(e.ids) <= block + 1 for e in data.examples)
    cut = data.examples[1]
    assert cut.ids == encode_for_training(tok, read_conversations(path)[1].messages)[0][: block + 1]
    assert "2 of 3 conversations" in data.warning() and "1 of them kept no assistant token" in data.warning()
    assert load_sft(write_jsonl(tmp_path / "ok.jsonl", QA), tok, 64).warning() is None
    with pytest.raises(DataError, match="before its first reply"):
        load_sft(write_jsonl(tmp_path / "only.jsonl", [long_question]), tok, block)


def test_a_tokenizer_without_pad_is_refused(small_text):
    with pytest.raises(TokenizerError, match="no <\\|pad\\|>"):
        pad_id(Tokenizer.train([small_text], 260, specials=[EOT]))


def _many(tmp_path, tok, n=23):
    rows = [{"prompt": f"Question number {i}?", "completion": "answer " * (1 + i % 4)} for i in range(n)]
    return load_sft(write_jsonl(tmp_path / "many.jsonl", rows), tok, 64).examples


def test_sampler_visits_every_example_once_per_epoch_in_a_seeded_order(tmp_path, tok):
    examples = _many(tmp_path, tok)
    s = SFTSampler(examples, pad_id(tok), seed=3)
    seen = []
    sizes = []
    while s.epoch == 0:
        x, y = s.next(5)
        sizes.append(len(x))
        seen += [tuple(r[r != pad_id(tok)].tolist()) for r in x]
    assert sizes == [5, 5, 5, 5, 3]  # a batch never crosses an epoch
    assert sorted(seen) == sorted(tuple(e.ids[:-1]) for e in examples)
    assert s.order(0) != s.order(1) and SFTSampler(examples, pad_id(tok), seed=3).order(0) == s.order(0)
    assert SFTSampler(examples, pad_id(tok), seed=4).order(0) != s.order(0)
    assert s.epochs_done == 1.0 and s.n_windows == s.n_examples == 23


def test_sampler_resume_is_exact(tmp_path, tok):
    examples = _many(tmp_path, tok)
    a = SFTSampler(examples, pad_id(tok), seed=1)
    for _ in range(7):
        a.next(4)
    state = json.loads(json.dumps(a.state_dict()))  # survives JSON (and torch.save)
    b = SFTSampler(examples, pad_id(tok), seed=1)
    b.load_state_dict(state)
    for _ in range(12):
        xa, ya = a.next(4)
        xb, yb = b.next(4)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = SFTSampler(examples[:-1], pad_id(tok), seed=1)
    with pytest.raises(DataError, match="differs from the data this run was saved with"):
        other.load_state_dict(state)


def test_split_and_ordered_batches(tmp_path, tok):
    examples = _many(tmp_path, tok)
    train, val = split_examples(examples, 0.2, seed=0)
    assert len(val) == 5 and len(train) == 18
    assert sorted(map(id, train + val)) == sorted(map(id, examples))
    assert split_examples(examples, 0.2, seed=0) == (train, val) and split_examples(examples, 0.2, seed=1) != (
        train,
        val,
    )
    got = [x for x, _ in batches(val, 2, pad_id(tok))]
    assert [len(x) for x in got] == [2, 2, 1]
    with pytest.raises(DataError, match="validation fraction"):
        split_examples(examples, 1.0)


def test_a_tiny_model_learns_the_replies_from_sft_batches(tmp_path, tok):
    """Training on these batches teaches exactly the replies: greedy decoding after the prompt gives them."""
    from gradlm.text.chat import encode_chat, stop_ids
    from gradlm.generation.generate import SamplingConfig

    rows = [{"prompt": f"dose of drug {c}?", "completion": f"{10 * (i + 1)} mg"} for i, c in enumerate("ABCD")]
    data = load_sft(write_jsonl(tmp_path / "qa.jsonl", rows), tok, 32)
    model = sft_fit(data.examples, tok)
    prompts = [encode_chat(tok, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    out = generate_ids(model, tok, prompts, SamplingConfig(temperature=0, max_new_tokens=10), stop_ids(tok))
    assert [tok.decode(o) for o in out] == [r["completion"] + END for r in rows]
