"""Every failure a user can cause, as one exception family with one clear message.

The CLI catches GradlmError, prints its message on one line and exits with code 2.
Anything else escaping is a bug in gradlm, and keeps its traceback.
"""


def flag(name: str) -> str:
    """How a setting is spelled on the command line: max_time -> --max-time (every message that names a flag)."""
    return "--" + name.replace("_", "-")


def cause(error: BaseException) -> str:
    """An exception in one line, for a warning that goes on without what failed: its type and the first line of its
    message (at most 200 characters)."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


class GradlmError(Exception):
    """A user-facing problem: the message says what was wrong and what to do."""


class DataError(GradlmError):
    """The input text or prepared data cannot be used (missing, empty, binary, bad encoding)."""


class TokenizerError(GradlmError):
    """A tokenizer cannot be trained, loaded or used as asked."""


class ConstraintError(GradlmError):
    """A constrained output that could not be finished: the constraint's matcher failed while decoding (the
    text so far does not fit the constraint)."""


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


def check_field_types(obj) -> None:
    """Check (and where lossless, convert) the fields of a config dataclass against the types of their
    defaults, so the Python API rejects a wrong type with one ConfigError, as the CLI's flags do.

    bool fields take bools; int fields take ints (not bools); float fields take ints or floats (stored as
    float); str fields take str; a field whose default is None takes None or an int; a tuple field takes
    a list or tuple of str. Every problem is reported at once."""
    import dataclasses

    problems = []
    for f in dataclasses.fields(obj):
        default, value = f.default, getattr(obj, f.name)
        where = f"{type(obj).__name__}.{f.name}"
        if isinstance(default, bool):
            ok = isinstance(value, bool)
            want = "True or False"
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
            want = "an integer"
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                setattr(obj, f.name, float(value))
            want = "a number"
        elif isinstance(default, str):
            ok = isinstance(value, str)
            want = "a string"
        elif default is None:
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
            want = "None or an integer"
        elif isinstance(default, tuple):
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            if ok:
                setattr(obj, f.name, tuple(value))
            want = "a list of strings"
        else:
            continue
        if not ok:
            problems.append(f"{where} must be {want}, got {value!r} ({type(value).__name__})")
    if problems:
        raise ConfigError("; ".join(problems))
