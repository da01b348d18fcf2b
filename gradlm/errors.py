"""Every failure a user can cause, as one exception family with one clear message.

The CLI catches GradlmError, prints its message on one line and exits with code 2.
Anything else escaping is a bug in gradlm, and keeps its traceback.
"""


class GradlmError(Exception):
    """A user-facing problem: the message says what was wrong and what to do."""


class DataError(GradlmError):
    """The input text or prepared data cannot be used (missing, empty, binary, bad encoding)."""


class TokenizerError(GradlmError):
    """A tokenizer cannot be trained, loaded or used as asked."""


class ConfigError(GradlmError):
    """A configuration value or command-line flag is invalid."""


class RunDirError(GradlmError):
    """A run directory is missing, incomplete or corrupt."""
