"""gradlm: train small GPT-style language models from your own text, by gradient descent you can see.

The public API. Names are imported on first use (PEP 562), so `import gradlm` does no work and
loading a model never pulls in the trainer.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "GPT": ("gradlm.model", "GPT"),
    "LM": ("gradlm.generate", "LM"),
    "GradlmError": ("gradlm.errors", "GradlmError"),
    "ModelConfig": ("gradlm.model", "ModelConfig"),
    "SamplingConfig": ("gradlm.generate", "SamplingConfig"),
    "Tokenizer": ("gradlm.tokenizer", "Tokenizer"),
    "TrainConfig": ("gradlm.config", "TrainConfig"),
    "ChatSession": ("gradlm.session", "ChatSession"),
    "FinetuneConfig": ("gradlm.finetune", "FinetuneConfig"),
    "evaluate_text": ("gradlm.evaluate", "evaluate_text"),
    "finetune": ("gradlm.finetune", "finetune"),
    "generate_text": ("gradlm.generate", "generate_text"),
    "load_lm": ("gradlm.generate", "load"),
    "load_model": ("gradlm.rundir", "load_model"),
    "merge": ("gradlm.finetune", "merge"),
    "stream_text": ("gradlm.generate", "stream_text"),
    "train": ("gradlm.trainer", "train"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gradlm' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
