"""The results store: one embedded SQLite database, one row per evaluated sample (schema in
:mod:`attnkit.eval.schema`).

Safe to share: the database runs in WAL mode with a 60 s busy timeout, so several sweeps (processes, Ray
workers) can write into one file at once, and every row is its own committed insert, ignored when its key
``(cell_key, sample_index)`` is already stored: a crash or ``kill -9`` loses at most the sample in flight, and a
sample written twice (two sweeps racing on the same cell) is stored once. The database must live on a local disk:
SQLite's locking is not reliable on network file systems.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from attnkit.eval.schema import SCHEMA, ZOO_SCHEMA

BUSY_TIMEOUT_S = 60.0

# Side table of the store (not results): file hashes keyed by path, size and mtime, so a model file is hashed once.
_FILE_HASHES = """
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
"""


def open_error(path: Path, exc: Exception | str) -> ValueError:
    """One line for a file that SQLite cannot read as a results database."""
    return ValueError(f"{path}: cannot open the results database ({exc})")


_UNPACK = {".gz": "gzip", ".xz": "lzma"}  # how committed databases are compressed (docs/results)


def read_only(path: str | os.PathLike) -> sqlite3.Connection:
    """A connection that cannot change the results database at ``path``: read-only, or for a ``.gz`` / ``.xz`` copy
    one to its unpacked copy in memory. A file that is not one (or a damaged one) is one ValueError, raised here."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results database at {path}")
    try:
        if path.suffix not in _UNPACK:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        else:
            import importlib
            import tempfile

            try:
                data = importlib.import_module(_UNPACK[path.suffix]).decompress(path.read_bytes())
            except Exception as exc:  # gzip's BadGzipFile / EOFError, lzma's LZMAError: a damaged copy
                raise open_error(path, f"{type(exc).__name__}: {exc}") from None
            with tempfile.TemporaryDirectory() as tmp:  # a WAL-mode file cannot be deserialized: copy it by backup
                disk = Path(tmp) / "r.db"
                disk.write_bytes(data)
                src, con = sqlite3.connect(disk), sqlite3.connect(":memory:")
                try:
                    src.backup(con)
                finally:
                    src.close()
        con.execute("SELECT 1 FROM sqlite_master").fetchall()  # reads the header: not SQLite fails here
    except sqlite3.Error as exc:
        raise open_error(path, exc) from None
    return con


class Store:
    """A results database. ``Store(path)`` creates the file and the schema if needed.

    >>> with Store("results.db") as store:
    ...     store.done(cell_key)        # {0, 1, 2}: sample indices already stored for that cell
    ...     store.add(row)              # True if written, False if (cell_key, sample_index) was already there
    ...     store.rows(task="vt", method=["snapkv", "h2o"])
    """

    def __init__(self, path: str | os.PathLike, timeout: float = BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)  # `--db results/x.db` on a fresh clone
        # isolation_level=None: no implicit transactions; each INSERT is its own atomic, committed transaction and
        # never upgrades a read lock (which in WAL mode fails with SQLITE_BUSY without waiting).
        try:
            self.conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:  # a folder, a file without read permission
            raise open_error(self.path, exc) from None
        try:
            self.conn.row_factory = sqlite3.Row
            self.conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")  # in WAL mode: durable across process crashes
            self.conn.executescript(SCHEMA + _FILE_HASHES + ZOO_SCHEMA)
            self._add_missing_columns()
            self.columns = [r["name"] for r in self.conn.execute("PRAGMA table_info(results)")]
        except sqlite3.DatabaseError as exc:  # not SQLite (a gzipped copy, another file), or a damaged one
            self.conn.close()
            raise open_error(self.path, exc) from None

    def _add_missing_columns(self) -> None:
        """Columns added to zoo_runs after a database was made (``slices_json``), with their defaults."""
        have = {r["name"] for r in self.conn.execute("PRAGMA table_info(zoo_runs)")}
        if "slices_json" not in have:
            try:
                self.conn.execute("ALTER TABLE zoo_runs ADD COLUMN slices_json TEXT NOT NULL DEFAULT '{}'")
            except sqlite3.OperationalError as exc:  # another process added it first
                if "duplicate column" not in str(exc):
                    raise

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- results --------------------------------------------------------------------------------------------------
    def done(self, cell_key: str) -> set[int]:
        """Sample indices stored for one cell."""
        cur = self.conn.execute("SELECT sample_index FROM results WHERE cell_key = ?", (cell_key,))
        return {r[0] for r in cur}

    def done_many(self, cell_keys: Iterable[str]) -> dict[str, set[int]]:
        """``{cell_key: sample indices}`` for many cells in a few queries."""
        out: dict[str, set[int]] = defaultdict(set)
        keys = list(dict.fromkeys(cell_keys))
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            cur = self.conn.execute(
                f"SELECT cell_key, sample_index FROM results WHERE cell_key IN ({','.join('?' * len(part))})", part
            )
            for key, index in cur:
                out[key].add(index)
        return {k: out.get(k, set()) for k in keys}

    def has(self, cell_key: str, sample_index: int) -> bool:
        cur = self.conn.execute(
            "SELECT 1 FROM results WHERE cell_key = ? AND sample_index = ? LIMIT 1", (cell_key, sample_index)
        )
        return cur.fetchone() is not None

    def add(self, row: dict[str, Any]) -> bool:
        """Insert one row (committed at once); False if its (cell_key, sample_index) was already stored."""
        unknown = [k for k in row if k not in self.columns]
        if unknown:
            raise ValueError(f"unknown result column(s): {', '.join(unknown)}; columns: {', '.join(self.columns)}")
        names = list(row)
        # Unlike INSERT OR IGNORE, ON CONFLICT ... DO NOTHING ignores only the duplicate, not a NULL in a NOT NULL
        # column (which must fail loudly rather than drop the row).
        sql = (f"INSERT INTO results ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
               "ON CONFLICT (cell_key, sample_index) DO NOTHING")
        cur = self.conn.execute(sql, [row[k] for k in names])
        return cur.rowcount == 1

    def rows(self, **filters: Any) -> list[dict[str, Any]]:
        """Rows as dicts in insertion order; ``column=value`` or ``column=[values]`` filters are ANDed."""
        where, params = [], []
        for column, value in filters.items():
            if column not in self.columns:
                raise ValueError(f"unknown result column '{column}'; columns: {', '.join(self.columns)}")
            if isinstance(value, (list, tuple, set, frozenset)):
                values = list(value)
                if not values:
                    return []
                where.append(f"{column} IN ({','.join('?' * len(values))})")
                params.extend(values)
            elif value is None:
                where.append(f"{column} IS NULL")
            else:
                where.append(f"{column} = ?")
                params.append(value)
        sql = "SELECT * FROM results" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        return [dict(r) for r in self.conn.execute(sql, params)]

    def scores(self, cell_keys: Iterable[str]) -> list[tuple[str, float]]:
        """(cell_key, score) of the stored rows of these cells (a light query for progress displays)."""
        keys, out = list(dict.fromkeys(cell_keys)), []
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            sql = f"SELECT cell_key, score FROM results WHERE cell_key IN ({','.join('?' * len(part))})"
            out.extend(tuple(r) for r in self.conn.execute(sql, part))
        return out

    def count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    # -- attnkit.zoo training runs --------------------------------------------------------------------------------
    def zoo_run(self, run_key: str) -> dict[str, Any] | None:
        """The stored row of a training run, or None."""
        cur = self.conn.execute("SELECT * FROM zoo_runs WHERE run_key = ?", (run_key,))
        row = cur.fetchone()
        return None if row is None else dict(row)

    def add_zoo_run(self, row: dict[str, Any]) -> bool:
        """Insert a finished run (provenance added here); False if its run_key was already stored."""
        from datetime import datetime, timezone

        row = {**row, "attnkit_version": attnkit_version(), "git_commit": git_commit(),
               "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        names = list(row)
        sql = (f"INSERT INTO zoo_runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
               "ON CONFLICT (run_key) DO NOTHING")
        return self.conn.execute(sql, [row[k] for k in names]).rowcount == 1

    def zoo_runs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM zoo_runs ORDER BY id")]

    # -- provenance -----------------------------------------------------------------------------------------------
    def file_sha256(self, path: str | os.PathLike) -> str:
        """sha256 of a file, cached in the database by (absolute path, size, mtime)."""
        path = Path(path).resolve()
        st = path.stat()
        cur = self.conn.execute(
            "SELECT sha256 FROM file_hashes WHERE path = ? AND size = ? AND mtime_ns = ?",
            (str(path), st.st_size, st.st_mtime_ns),
        )
        if (hit := cur.fetchone()) is not None:
            return hit[0]
        digest = sha256_file(path)
        self.conn.execute(
            "INSERT OR REPLACE INTO file_hashes (path, size, mtime_ns, sha256) VALUES (?, ?, ?, ?)",
            (str(path), st.st_size, st.st_mtime_ns, digest),
        )
        return digest


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def model_hash(name: str, store: Store | None = None) -> str:
    """sha256 identifying a model: of the GGUF file for embedded names and ``.gguf`` paths, of ``config.json``
    for model folders and Hub ids (fetched into the HF cache). Raises ModelLoadError for an unknown name."""
    from attnkit.models import _resolve_source  # the loader's own name resolution, with its one-line errors

    kind, source = _resolve_source(name)
    if kind == "gguf":
        return store.file_sha256(source) if store is not None else sha256_file(source)
    if kind == "folder":
        return sha256_file(Path(source) / "config.json")
    from huggingface_hub import hf_hub_download

    from attnkit.models import ModelLoadError, _hub_unreachable

    reason = _hub_unreachable()
    try:
        path = hf_hub_download(source, "config.json", local_files_only=reason is not None)
    except Exception as err:  # network, auth, missing repo: all one line for the user
        why = reason or str(err).strip().splitlines()[0]
        raise ModelLoadError(f"{source}: cannot fetch config.json from the Hugging Face Hub ({why})") from None
    return sha256_file(path)


@functools.cache
def git_commit() -> str:
    """HEAD of the git checkout attnkit runs from (``-dirty`` if tracked files changed), else ``unknown``."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return "unknown"
    try:
        run = functools.partial(subprocess.run, cwd=root, capture_output=True, text=True, timeout=10)
        head = run(["git", "rev-parse", "HEAD"])
        if head.returncode != 0:
            return "unknown"
        # --no-optional-locks: a read-only check, never rewrites the index
        dirty = run(["git", "--no-optional-locks", "diff-index", "--quiet", "HEAD", "--"]).returncode == 1
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def source_hash() -> str:
    """sha256 (16 hex digits) of attnkit's own ``.py`` files: names the code that ran, also without git metadata.

    A commit alone can mislead: a copy of the tree (a GPU machine, a wheel, ``-dirty``) may not match it.
    """
    return tree_hash(Path(__file__).resolve().parents[1])


def tree_hash(root: Path) -> str:
    """sha256 (16 hex digits) over the relative names and bytes of the ``.py`` files below ``root``."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def attnkit_version() -> str:
    import attnkit

    return attnkit.__version__


def dumps(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): what cell keys are hashed from and JSON columns hold."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
