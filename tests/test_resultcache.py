"""Results keyed by configuration + input fingerprints: reuse on identical inputs, recompute on any change."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from captionlab import resultcache
from captionlab.resultcache import ResultCache, fingerprint, held_fingerprints


def _counting(calls: list, payload: str = "w"):
    def compute(out: Path) -> dict:
        calls.append(out)
        (out / "weights.txt").write_text(payload)
        return {"score": len(calls), "file": str(out / "weights.txt")}
    return compute


def test_same_config_and_inputs_reuse_and_change_recomputes(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.json").write_text('{"x": 1}')
    cache = ResultCache(tmp_path / "results")
    calls: list = []
    first = cache.run("attempt", {"peft": "lora", "rank": 4}, _counting(calls), inputs=[data])
    assert not first.reused and len(calls) == 1
    # the value's paths point into the final entry, and the file written there survived the rename
    assert Path(first.value["file"]).read_text() == "w" and Path(first.value["file"]).parent == first.dir
    again = cache.run("attempt", {"rank": 4, "peft": "lora"}, _counting(calls), inputs=[data])  # key order free
    assert again.reused and again.value == first.value and len(calls) == 1
    assert "reused cached" in again.describe("adapter attempt")
    other = cache.run("attempt", {"peft": "lora", "rank": 8}, _counting(calls), inputs=[data])
    assert not other.reused and len(calls) == 2 and other.key != first.key
    (data / "a.json").write_text('{"x": 2}')  # a changed input invalidates
    changed = cache.run("attempt", {"peft": "lora", "rank": 4}, _counting(calls), inputs=[data])
    assert not changed.reused and len(calls) == 3


def test_failed_compute_leaves_no_entry_and_the_rerun_continues_in_its_folder(tmp_path: Path):
    cache = ResultCache(tmp_path / "results")
    seen: list[Path] = []

    def boom(out: Path) -> dict:
        seen.append(out)
        (out / "step-1.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.run("train", {"a": 1}, boom)
    assert not (tmp_path / "results" / "train" / cache.key("train", {"a": 1}) / "result.json").exists()

    def resume(out: Path) -> dict:
        seen.append(out)
        return {"resumed_from": sorted(p.name for p in out.iterdir())}

    r = cache.run("train", {"a": 1}, resume)
    assert seen[0] == seen[1] and r.value == {"resumed_from": ["step-1.bin"]} and not r.reused
    assert (r.dir / "step-1.bin").exists() and not seen[0].exists()


def test_disabled_cache_always_computes(tmp_path: Path):
    calls: list = []
    cache = ResultCache(tmp_path / "results", enabled=False)
    cache.run("eval", {"a": 1}, _counting(calls))
    cache.run("eval", {"a": 1}, _counting(calls))
    assert len(calls) == 2


def test_fingerprint_tracks_content_names_and_large_files(tmp_path: Path, monkeypatch):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "x.txt").write_text("one")
    fp = fingerprint(d)
    assert fingerprint(d) == fp
    (d / "sub" / "x.txt").write_text("two")
    assert fingerprint(d) != fp
    fp2 = fingerprint(d)
    (d / "sub" / "x.txt").rename(d / "sub" / "y.txt")
    assert fingerprint(d) != fp2
    assert fingerprint(tmp_path / "nope") == fingerprint(tmp_path / "nope2")  # both missing
    listing = fingerprint(d, content=False)
    (d / "sub" / "y.txt").write_text("six")  # same size and (maybe) same mtime: a listing may not notice...
    os.utime(d / "sub" / "y.txt", ns=(5, 5))
    assert fingerprint(d, content=False) != listing  # ...but a new mtime it does
    monkeypatch.setattr(resultcache, "HASH_LIMIT", 2)
    big = tmp_path / "big.bin"
    big.write_bytes(b"abc")
    fp_big = fingerprint(big)
    os.utime(big, ns=(1, 1))
    assert fingerprint(big) != fp_big  # large files: size + mtime


def test_held_fingerprints_reads_each_path_once_per_block(tmp_path: Path, monkeypatch):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x.txt").write_text("one")
    reads = []
    digest = resultcache._file_digest
    monkeypatch.setattr(resultcache, "_file_digest", lambda path, h, content=True: (reads.append(path),
                                                                                      digest(path, h, content)))
    cache = ResultCache(tmp_path / "cache")
    with held_fingerprints():
        keys = {cache.key("k", {"n": n}, inputs=[d], listings=[d]) for n in range(3)}
        assert len(keys) == 3 and len(reads) == 2  # three keys, the folder read once by content, once by listing
        with held_fingerprints():  # a nested block shares the outer one's
            fingerprint(d)
        assert len(reads) == 2
        held = fingerprint(d)
    (d / "x.txt").write_text("two")
    assert fingerprint(d) != held  # outside a block every call looks again
    assert len(reads) == 3


def test_unjsonable_config_is_refused(tmp_path: Path):
    with pytest.raises(TypeError, match="object"):
        ResultCache(tmp_path).key("x", {"model": object()})


def test_result_json_records_config(tmp_path: Path):
    cache = ResultCache(tmp_path / "results")
    r = cache.run("eval", {"metric": "CIDEr"}, lambda out: {"CIDEr": 1.5})
    doc = json.loads((r.dir / "result.json").read_text())
    assert doc["config"] == {"metric": "CIDEr"} and doc["value"] == {"CIDEr": 1.5} and doc["kind"] == "eval"
