"""Atomic file I/O: writes that a crash cannot leave half done, and reads that never unpickle.

Every write goes to a temporary file in the destination folder, is fsynced, then renamed over the
target, so a crash at any moment leaves either the old file or the new one, never half of one; a
folder is written whole the same way (atomic_write_dir). What goes where in a run directory is
gradlm/rundir.py's business; this module only knows files.
Loading never unpickles: tensors come from safetensors, metadata from JSON, and optimizer state through
torch.load(weights_only=True).
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are written or read: preparing data never loads it
    import torch

from gradlm.errors import ConfigError, RunDirError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(path: str | os.PathLike, what: str, is_dir: bool = False) -> Path:
    """Check, before any work, that an output can be written at path; returns it as a Path.

    The rule for every output: missing parent folders are created when the output is written; a parent
    that is a file, a place that is not writable, or a file where a folder is wanted (or the reverse) is
    a ConfigError naming the path, raised before a sweep or a training spends minutes. Whether an
    existing output may be replaced is the caller's rule (runs need --resume, exports a previous export)."""
    p = Path(path)
    if p.exists() and is_dir and not p.is_dir():
        raise ConfigError(f"{what} {p} is a file; give a directory")
    if p.exists() and not is_dir and p.is_dir():
        raise ConfigError(f"{what} {p} is a directory; give a file name")
    place = p if p.is_dir() else p.parent
    while not place.exists() and place != place.parent:  # the nearest folder that exists
        place = place.parent
    if not place.is_dir():
        raise ConfigError(f"{what} {p} cannot be created: {place} is a file, not a directory")
    if not os.access(place, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {p} cannot be written: {place} is not writable; choose another place")
    return p


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, and is someone else's
        return True
    return True


def remove_stale(path: Path) -> None:
    """Remove what a killed writer of path left beside it: its temporaries (.NAME.PID.*), named after the process
    that made them, whose process is gone. A live writer's, or another program's, are left alone."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for p in sorted(path.parent.glob(f".{glob.escape(path.name)}.*")):
        pid = p.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if p.suffix == ".old" and (p / "x").is_dir() and not path.exists():
                os.replace(p / "x", path)  # killed between moving the previous folder aside and the new one in
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux's renameat2 with RENAME_EXCHANGE); False where the system or
    the filesystem cannot, and nothing has moved."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def stage(path: Path, write: Callable[[str], None]) -> Path:
    """Write a temporary file beside path with write(tmp) and fsync it; the caller renames it into
    place (os.replace) when ready. A failure removes the temporary file and re-raises; what a kill left
    (a temporary whose process is gone) is removed by the next writer of path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600 (and a writer may recreate the file): the usual permissions
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def sync_dir(folder: Path) -> None:
    """Make renames in folder durable (best effort: some filesystems refuse fsync on a directory)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def install(tmp: Path, path: Path) -> None:
    """Rename a staged file over path, durably; a failure removes the staged file."""
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_dir(Path(path).parent)


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    install(stage(path, write), path)


def link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes the same content as src, atomically: a hard link where the filesystem allows it
    (no copy; src is later replaced by rename, never rewritten in place), else a copy."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        tmp = stage(dst, lambda t: shutil.copyfile(src, t))
    install(tmp, dst)


def atomic_write_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a fresh folder beside target, then rename it into place, replacing a previous
    target whole. A failure at any point leaves the previous target (or nothing) and no temp folder."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)  # a folder a killed writer was filling, or the previous target it had moved aside
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    try:
        write(tmp)
        # mkdtemp makes a private folder; give it (and its files) the permissions mkdir/open would.
        mask = _umask()
        tmp.chmod(0o777 & ~mask)
        for f in tmp.rglob("*"):
            f.chmod((0o777 if f.is_dir() else 0o666) & ~mask)
        if target.is_dir() and any(target.iterdir()):
            if _exchange(tmp, target):  # one atomic swap: target is the previous folder, then the new one
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous one
            # no atomic swap here: move the previous one aside, then the new one in (remove_stale undoes a kill between)
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".old", dir=target.parent))
                os.replace(target, old / "x")
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)  # rename over a missing or empty directory
        sync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def strict(obj):
    """obj with every float that JSON cannot hold (NaN, +-Infinity) as None, and numpy/torch scalars as
    Python numbers: what `json.dumps(allow_nan=False)` accepts and every JSON parser reads back."""
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):  # numpy / torch scalar
        try:
            obj = obj.item()
        except (TypeError, ValueError, RuntimeError):
            return obj
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj, **kw) -> str:
    """Strict JSON text of obj (see strict): never NaN or Infinity, which JSON.parse and jq reject."""
    return json.dumps(strict(obj), allow_nan=False, **kw)


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, dumps(obj, indent=2) + "\n")


def write_weights(
    path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file (not atomically: see save_weights). Tied tensors are stored once
    (safetensors forbids aliasing). metadata holds at most one key: safetensors keeps metadata in a
    hash map whose order changes from process to process, and equal weights must give equal bytes."""
    if metadata and len(metadata) > 1:
        raise ValueError(f"one metadata key at most, got {sorted(metadata)}")
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[k] = v.detach().contiguous()
    from safetensors.torch import save_file

    save_file(out, str(path), metadata=metadata or None)


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically."""
    _atomic(path, lambda tmp: write_weights(tmp, state, metadata))


def weights_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (its header only; the tensors are not read)."""
    if not Path(path).is_file():
        raise RunDirError(f"missing weights file {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise RunDirError(f"cannot read weights {path} ({e}); the file is corrupt or not safetensors") from None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise RunDirError(f"missing weights file {path}")
    try:
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise RunDirError(f"cannot read weights {path} ({e}); the file is corrupt or not safetensors") from None


def load_torch(path: Path):
    try:
        import torch

        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunDirError(f"missing training state {path}") from None
    except Exception as e:
        raise RunDirError(f"cannot read training state {path} ({e}); it is corrupt") from None


def read_json(path: Path, what: str = "file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"missing {what} {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); the {what} is corrupt") from None
