"""The results store: schema, idempotent inserts, filters, the file-hash cache and concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time

import pytest

from attnkit.eval import store as store_mod
from attnkit.eval.store import Store


def row(key: str = "k1", index: int = 0, **over) -> dict:
    base = {
        "cell_key": key, "sample_index": index, "model": "tiny", "model_hash": "h", "method": "full",
        "settings_json": "{}", "budget": "", "budget_tokens": None, "task": "t", "family": "retrieval",
        "length": 128, "depth": None, "seed": 0, "prompt_tokens": 100, "score": 1.0, "prediction": "x",
        "references_json": "[]", "kv_bytes_peak": 10, "prefill_s": 0.1, "decode_s_per_token": None,
        "peak_mem_bytes": 1, "device": "cpu", "dtype": "float32", "extra_json": "{}", "attnkit_version": "0",
        "git_commit": "unknown", "config_json": "{}", "created_at": "now",
    }  # fmt: skip
    return {**base, **over}


def test_add_is_idempotent_and_done_lists_indices(tmp_path):
    with Store(tmp_path / "r.db") as store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.add(row("a", 0)) and store.add(row("a", 2)) and store.add(row("b", 0))
        assert not store.add(row("a", 0, score=0.0))  # second write of a sample: ignored, first kept
        assert store.done("a") == {0, 2} and store.done("zzz") == set()
        assert store.done_many(["a", "b", "c"]) == {"a": {0, 2}, "b": {0}, "c": set()}
        assert store.has("a", 2) and not store.has("a", 1)
        assert store.count() == 3
        assert [r["score"] for r in store.rows(cell_key="a")] == [1.0, 1.0]
        assert len(store.rows(cell_key=["a", "b"])) == 3 and store.rows(cell_key=[]) == []
        assert store.rows(budget_tokens=None, sample_index=0, cell_key="b")[0]["model"] == "tiny"
        assert sorted(store.scores(["a", "b"])) == [("a", 1.0), ("a", 1.0), ("b", 1.0)]
        with pytest.raises(ValueError, match="unknown result column 'nope'"):
            store.rows(nope=1)
        with pytest.raises(ValueError, match="unknown result column"):
            store.add({**row("c"), "nope": 1})
        with pytest.raises(sqlite3.IntegrityError):  # NOT NULL columns are enforced
            store.add({**row("c"), "score": None})
    with Store(tmp_path / "r.db") as again:  # reopening keeps everything (schema is IF NOT EXISTS)
        assert again.count() == 3


def test_file_hash_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 100)
    calls = []
    real = store_mod.sha256_file
    monkeypatch.setattr(store_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    with Store(tmp_path / "r.db") as store:
        first = store.file_sha256(f)
        assert store.file_sha256(f) == first and len(calls) == 1
    with Store(tmp_path / "r.db") as store:  # cached in the database, across processes
        assert store.file_sha256(f) == first and len(calls) == 1
        time.sleep(0.01)
        f.write_bytes(b"GGUF" + b"\1" * 100)
        assert store.file_sha256(f) != first and len(calls) == 2


def test_provenance_helpers():
    commit = store_mod.git_commit()
    assert commit == "unknown" or len(commit.removesuffix("-dirty")) == 40
    import attnkit

    assert store_mod.attnkit_version() == attnkit.__version__
    assert store_mod.dumps({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    assert len(store_mod.source_hash()) == 16


def test_tree_hash_names_the_code(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("ignored")
    first = store_mod.tree_hash(tmp_path)
    (tmp_path / "notes.txt").write_text("changed, still ignored")
    assert store_mod.tree_hash(tmp_path) == first
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert store_mod.tree_hash(tmp_path) != first
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "a.py").rename(tmp_path / "pkg" / "b.py")  # same bytes, another file
    assert store_mod.tree_hash(tmp_path) != first


def _writer(path: str, worker: int, count: int) -> None:
    with Store(path) as store:
        for i in range(count):  # every worker writes the same samples: exactly one copy must survive
            store.add(row("shared", i, prediction=f"w{worker}"))
            store.add(row(f"own{worker}", i))


def test_concurrent_writers_neither_fail_nor_duplicate(tmp_path):
    path = str(tmp_path / "r.db")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 100)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    with Store(path) as store:
        assert store.done("shared") == set(range(100))
        assert store.count() == 100 + 3 * 100
        dupes = store.conn.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM results GROUP BY cell_key, sample_index HAVING COUNT(*) > 1)"
        ).fetchone()[0]
        assert dupes == 0


def test_store_creates_missing_parent_folders(tmp_path):
    from attnkit.eval.store import Store

    path = tmp_path / "new" / "dir" / "results.db"
    Store(path)
    assert path.is_file()


def test_a_file_that_is_not_a_results_database_is_one_clear_error(tmp_path):
    text = tmp_path / "notes.db"
    text.write_text("not SQLite " * 100)
    for path in (text, tmp_path):  # a text file, a folder
        with pytest.raises(ValueError, match=f"^{path}: cannot open the results database \\("):
            Store(path)
        with pytest.raises(ValueError, match=f"^{path}: cannot open the results database \\(") if path.is_file() \
                else pytest.raises(FileNotFoundError, match="no results database"):
            store_mod.read_only(path)


@pytest.mark.parametrize("suffix, pack", [(".gz", "gzip"), (".xz", "lzma")])
def test_read_only_reads_compressed_copies_as_they_are(tmp_path, suffix, pack):
    import importlib

    with Store(tmp_path / "r.db") as store:
        store.add(row("a", 0))
        store.add(row("a", 1, score=0.5))
    packed = tmp_path / f"r.db{suffix}"
    packed.write_bytes(importlib.import_module(pack).compress((tmp_path / "r.db").read_bytes()))
    query = "SELECT cell_key, sample_index, score FROM results ORDER BY id"
    assert store_mod.read_only(packed).execute(query).fetchall() == [("a", 0, 1.0), ("a", 1, 0.5)]
    packed.write_bytes(packed.read_bytes()[:40])  # cut short
    with pytest.raises(ValueError, match=f"{packed}: cannot open the results database"):
        store_mod.read_only(packed)
    with pytest.raises(sqlite3.OperationalError):  # read-only: nothing is written through it
        store_mod.read_only(tmp_path / "r.db").execute("DELETE FROM results")
