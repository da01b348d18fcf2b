"""The dataset registry: mirror first, then cache, then a checksummed download (file:// URLs stand in for
the network, through the same urllib code)."""

import hashlib

import pytest

from gradlm.text import datasets
from gradlm.errors import DataError


@pytest.fixture
def fake(tmp_path, monkeypatch):
    src = tmp_path / "origin" / "corpus.txt"
    src.parent.mkdir()
    src.write_text("To be, or not to be.\n" * 100)
    ds = datasets.Dataset(
        "fake", src.as_uri(), hashlib.sha256(src.read_bytes()).hexdigest(), "corpus.txt", "test corpus"
    )
    monkeypatch.setitem(datasets.REGISTRY, "fake", ds)
    monkeypatch.setenv("GRADLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GRADLM_DATA_MIRROR", raising=False)
    return src, ds


def test_download_verifies_and_caches(fake, tmp_path):
    src, _ = fake
    path = datasets.resolve("fake")
    assert path == tmp_path / "cache" / "datasets" / "corpus.txt" and path.read_bytes() == src.read_bytes()
    src.unlink()  # the second lookup must come from the cache, not the network
    assert datasets.resolve("fake") == path


def test_checksum_mismatch_is_refused_and_leaves_nothing(fake, tmp_path, monkeypatch):
    src, ds = fake
    monkeypatch.setitem(datasets.REGISTRY, "fake", datasets.Dataset("fake", ds.url, "0" * 64, ds.filename, ""))
    with pytest.raises(DataError, match="sha256"):
        datasets.resolve("fake")
    assert not any((tmp_path / "cache" / "datasets").iterdir())


def test_mirror_is_used_first_and_checked(fake, tmp_path, monkeypatch):
    src, _ = fake
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "corpus.txt").write_bytes(src.read_bytes())
    monkeypatch.setenv("GRADLM_DATA_MIRROR", str(mirror))
    assert datasets.resolve("fake") == mirror / "corpus.txt"
    (mirror / "corpus.txt").write_text("tampered")
    with pytest.raises(DataError, match="does not match"):
        datasets.resolve("fake")


def test_unreachable_url_and_unknown_name(fake, monkeypatch):
    _, ds = fake
    monkeypatch.setitem(
        datasets.REGISTRY, "fake", datasets.Dataset("fake", "file:///nonexistent/x.txt", ds.sha256, ds.filename, "")
    )
    with pytest.raises(DataError, match="GRADLM_DATA_MIRROR"):
        datasets.resolve("fake")
    with pytest.raises(DataError, match="registered"):
        datasets.resolve("wikipedia")
