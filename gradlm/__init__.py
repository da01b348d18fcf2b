"""gradlm: train small GPT-style language models from your own text, by gradient descent you can see.

The public API, re-exported; importing gradlm does no work.
"""

from gradlm.errors import GradlmError
from gradlm.evaluate import evaluate_text
from gradlm.generate import LM, SamplingConfig, generate_text, stream_text
from gradlm.generate import load as load_lm
from gradlm.model import GPT, ModelConfig
from gradlm.tokenizer import Tokenizer
from gradlm.train import TrainConfig, load_model, train

__all__ = [
    "GPT",
    "LM",
    "GradlmError",
    "ModelConfig",
    "SamplingConfig",
    "Tokenizer",
    "TrainConfig",
    "evaluate_text",
    "generate_text",
    "load_lm",
    "load_model",
    "stream_text",
    "train",
]
__version__ = "0.1.0"
