"""The public API as the README shows it: train, load, generate, stream, evaluate from Python."""

import pytest

import gradlm
from gradlm import ModelConfig, SamplingConfig, TrainConfig, generate_text, load_lm, load_model, train

pytestmark = pytest.mark.numerics  # tools/test_cpus.py runs these under every CPU kernel choice


def test_public_api_names_exist():
    assert all(hasattr(gradlm, name) for name in gradlm.__all__)


def test_readme_python_example_with_tiny_settings(tmp_path, text_file):
    summary = train(
        ModelConfig(n_layer=2, d_model=32, n_head=4, block_size=32),
        TrainConfig(
            data=str(text_file),
            out=str(tmp_path / "api"),
            vocab_size=300,
            max_steps=5,
            eval_tokens=1024,
            progress=False,
            plots=False,
        ),
    )
    assert summary["steps"] == 5 and 0 < summary["val_bpb"] < 9
    model, tok = load_model(tmp_path / "api")
    text = generate_text(model, tok, "ROMEO:", SamplingConfig(temperature=0.8, seed=1, max_new_tokens=10))
    assert text == generate_text(model, tok, "ROMEO:", SamplingConfig(temperature=0.8, seed=1, max_new_tokens=10))
    lm = load_lm(tmp_path / "api")
    assert "".join(lm.stream("ROMEO:", temperature=0, max_new_tokens=10)) == generate_text(
        model, tok, "ROMEO:", SamplingConfig(temperature=0, max_new_tokens=10)
    )
    score = gradlm.evaluate_text(model, tok, text_file.read_text()[:3000])
    assert score.loss > 0
