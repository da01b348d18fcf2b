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


class BusyError(GradlmError):
    """The server has as many requests waiting as it allows; try again in a moment."""


class Interrupted(GradlmError):
    """Work stopped by SIGINT/SIGTERM after saving what it could; the CLI exits with exit_code
    (130 for SIGINT, 143 for SIGTERM, as a shell reports a process killed by the signal)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Diverged(GradlmError):
    """Training diverged and the divergence guard gave up (the last good state is saved)."""
