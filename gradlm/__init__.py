"""gradlm: train small GPT-style language models from your own text, by gradient descent you can see.

The public API. Names are imported on first use (PEP 562), so `import gradlm` does no work and
loading a model never pulls in the trainer.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "GPT": ("gradlm.model.transformer", "Transformer"),  # the public name of the model (the class is Transformer)
    "Transformer": ("gradlm.model.transformer", "Transformer"),
    "LM": ("gradlm.generation.generate", "LM"),
    "GradlmError": ("gradlm.errors", "GradlmError"),
    "ModelConfig": ("gradlm.model.transformer", "ModelConfig"),
    "SamplingConfig": ("gradlm.generation.generate", "SamplingConfig"),
    "Tokenizer": ("gradlm.text.tokenizer", "Tokenizer"),
    "TrainConfig": ("gradlm.training.config", "TrainConfig"),
    "ChatSession": ("gradlm.generation.session", "ChatSession"),
    "FinetuneConfig": ("gradlm.training.finetune", "FinetuneConfig"),
    "evaluate_text": ("gradlm.evaluation.evaluate", "evaluate_text"),
    "finetune": ("gradlm.training.finetune", "finetune"),
    "generate_text": ("gradlm.generation.generate", "generate_text"),
    "load_lm": ("gradlm.generation.generate", "load"),
    "load_model": ("gradlm.rundir", "load_model"),
    "merge": ("gradlm.training.finetune", "merge"),
    "stream_text": ("gradlm.generation.generate", "stream_text"),
    "train": ("gradlm.training.trainer", "train"),
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
