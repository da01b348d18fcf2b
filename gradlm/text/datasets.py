"""Named corpora: a name resolves to a verified local file, from a mirror, the cache, or the network.

Lookup order for a registered name:
  1. $GRADLM_DATA_MIRROR/<filename>  (a folder of pre-fetched corpora; CI points it at ../shared/data)
  2. the cache, $GRADLM_CACHE/datasets/<filename> (default ~/.cache/gradlm)
  3. download from the URL into the cache
Every file is checked against its sha256 before use; a mismatch is an error, never silently used.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gradlm.errors import DataError
from gradlm.layout import cache_dir


@dataclass(frozen=True)
class Dataset:
    name: str
    url: str
    sha256: str
    filename: str
    description: str


REGISTRY: dict[str, Dataset] = {
    d.name: d
    for d in [
        Dataset(
            name="shakespeare",
            url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            filename="tinyshakespeare.txt",
            description="tiny Shakespeare: 40,000 lines of plays, 1.1 MB",
        )
    ]
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve(name: str) -> Path:
    """The local path of a registered corpus, fetching and verifying it if needed."""
    if name not in REGISTRY:
        raise DataError(f"unknown dataset {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    ds = REGISTRY[name]
    mirror = os.environ.get("GRADLM_DATA_MIRROR")
    if mirror:
        p = Path(mirror) / ds.filename
        if p.is_file():
            if sha256_file(p) != ds.sha256:
                raise DataError(f"{p} does not match the sha256 of {name}; remove it or fix GRADLM_DATA_MIRROR")
            return p
    cached = cache_dir() / "datasets" / ds.filename
    if cached.is_file() and sha256_file(cached) == ds.sha256:
        return cached
    return _download(ds, cached)


def _download(ds: Dataset, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(ds.url, timeout=60) as r, open(tmp, "wb") as f:
            for block in iter(lambda: r.read(1 << 16), b""):
                h.update(block)
                f.write(block)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"cannot download {ds.name} from {ds.url} ({e}); put {ds.filename} in a folder and set "
            "GRADLM_DATA_MIRROR to it, or pass a local file to --data"
        ) from None
    if h.hexdigest() != ds.sha256:
        tmp.unlink(missing_ok=True)
        raise DataError(f"downloaded {ds.name} has sha256 {h.hexdigest()}, expected {ds.sha256}; not using it")
    os.replace(tmp, dest)
    return dest
