"""The results store: an embedded SQLite database plus lm-eval-style files per run.

Records are written per batch of documents in one transaction, so a run killed at any point
keeps everything it finished and a restart with the same command recomputes nothing stored.
WAL mode and a busy timeout let several runs write to one store at once.

Schema versions (``PRAGMA user_version``): 1 (or 0, unset) is the original schema; 2 adds each task
result's metric specs and output type (``task_results.metric_specs``, ``task_results.output_type``).
Opening an older store adds the columns, NULL for the results already stored; readers get
``specs=None`` and ``output_type=None`` for those and decide their own fallback. Schema 3 adds
``records.cache_key`` (see ``harness.runner.cache_key``): a record stored by any run is reused by
another whose document, rendered requests, task spec, model fingerprint and seed are the same.
Records stored before schema 3 have none and are never reused across runs.

Every SQLite error becomes one ``HarnessError`` naming the file (corrupt, disk full, read-only); a
store whose file or folder cannot be written (a read-only mount) is opened read-only and refuses writes.
"""
from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from harness.errors import HarnessError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    status TEXT NOT NULL,                 -- running | complete | failed | interrupted
    kind TEXT NOT NULL DEFAULT 'eval',    -- eval | throughput
    model TEXT NOT NULL,
    config TEXT NOT NULL,                 -- JSON: the command's settings (identity of the run)
    model_fingerprint TEXT NOT NULL,      -- JSON
    env TEXT NOT NULL,                    -- JSON: versions, git sha, hardware
    output_dir TEXT
);
CREATE TABLE IF NOT EXISTS task_results (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    task TEXT NOT NULL,
    task_hash TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    n INTEGER NOT NULL,
    metrics TEXT NOT NULL,                -- JSON: {metric: value, metric_stderr: value}
    settings TEXT NOT NULL,               -- JSON
    metric_specs TEXT,                    -- JSON: [Metric spec as a dict] (schema 2; NULL in older stores)
    output_type TEXT,                     -- the task's output type (schema 2; NULL in older stores)
    PRIMARY KEY (run_id, task)
);
CREATE TABLE IF NOT EXISTS records (
    run_id TEXT NOT NULL,
    task TEXT NOT NULL,
    doc_id INTEGER NOT NULL,
    metrics TEXT NOT NULL,                -- JSON: per-example metrics
    record TEXT NOT NULL,                 -- JSON: the sample line
    cache_key TEXT,                       -- what determined it (schema 3; NULL in older stores)
    PRIMARY KEY (run_id, task, doc_id)
);
CREATE TABLE IF NOT EXISTS measurements (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    record TEXT NOT NULL,                 -- JSON: one throughput/latency measurement
    PRIMARY KEY (run_id, seq)
);
"""
SCHEMA_VERSION = 3
# columns added since schema 1: (table, column, declaration)
MIGRATIONS = (("task_results", "metric_specs", "TEXT"), ("task_results", "output_type", "TEXT"),
              ("records", "cache_key", "TEXT"))


def wal_mode(db: sqlite3.Connection, seconds: float = 60.0) -> None:
    """Switch to WAL. SQLite answers "locked" at once, without waiting, while another process
    creates the same new store (two ranks starting together), so the switch is retried."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def default_store_path(output_dir: Path) -> Path:
    return Path(os.environ.get("HARNESS_STORE") or output_dir / "store.sqlite")


F = TypeVar("F", bound=Callable[..., Any])
PASSES: dict[str, int] = {}  # how often this process passed each pause point


def pause_point(name: str) -> None:
    """Fault-injection hook: with ``HARNESS_PAUSE_AT=name:N`` (the Nth time this process gets here),
    touch ``$HARNESS_PAUSE_FILE`` and sleep ``$HARNESS_PAUSE_S`` seconds, so a test's kill lands here."""
    PASSES[name] = PASSES.get(name, 0) + 1
    if os.environ.get("HARNESS_PAUSE_AT") == f"{name}:{PASSES[name]}":
        Path(os.environ["HARNESS_PAUSE_FILE"]).touch()
        time.sleep(float(os.environ.get("HARNESS_PAUSE_S", "60")))


def writable(path: Path) -> bool:
    """True when ``path`` can be written (False on a read-only mount, even for root)."""
    return os.access(path, os.W_OK)


def check_writable_folder(folder: Path, what: str, create: bool = True) -> None:
    """Write a probe file in ``folder`` (created first, or with ``create=False`` in its nearest
    existing parent, so nothing is left behind); one-line error when that fails."""
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        probe = next(p for p in (folder, *folder.absolute().parents) if p.exists()) / f".write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise HarnessError(f"{what} '{folder}' is not writable ({exc.strerror or exc})") from None


def guarded(method: F) -> F:
    """Run a Store method with its SQLite errors turned into one-line HarnessErrors."""
    @functools.wraps(method)
    def wrapper(self: "Store", *args: Any, **kwargs: Any) -> Any:
        with self.guard():
            return method(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


class Store:
    def __init__(self, path: str | os.PathLike, *, create: bool = True):
        """Open (``create``: or create) the store at ``path``; read-only when it cannot be written."""
        self.path = Path(path)
        if self.path.is_dir():
            raise HarnessError(f"store path '{self.path}' is a directory; give a file name")
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise HarnessError(f"store folder '{self.path.parent}' is a file")
        if not self.path.is_file():
            if not create:
                raise HarnessError(f"no results store at {self.path}")
            check_writable_folder(self.path.parent, "store folder")
        self.readonly = self.path.is_file() and not (writable(self.path) and writable(self.path.parent))
        with self.guard():
            self.connect()

    def connect(self) -> None:
        """Open ``self.db``; a writable store gets WAL mode, the schema and its migrations."""
        if self.readonly:  # immutable: no -wal/-shm file can be made next to it
            mode = "ro&immutable=1" if not writable(self.path.parent) else "ro"
            self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode={mode}", uri=True, isolation_level=None)
            self.db.execute("SELECT COUNT(*) FROM runs").fetchone()
            return
        self.db = db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        wal_mode(db)
        db.execute("PRAGMA busy_timeout=60000")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        self.migrate()
        db.execute("CREATE INDEX IF NOT EXISTS records_cache_key ON records(cache_key)")
        db.execute("SELECT COUNT(*) FROM runs").fetchone()  # a cheap probe: corruption shows before weights load

    @contextmanager
    def guard(self) -> Iterator[None]:
        """SQLite errors as one line naming the store: disk full, read-only, busy, or corrupt."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            text = str(exc)
            if "full" in text:
                why = "the disk is full; what was stored is kept: free space and run the same command to resume"
            elif "readonly" in text or "read-only" in text:
                why = "it is read-only"
            elif "locked" in text or "busy" in text:
                why = "another process holds it locked"
            else:
                why = "it is corrupt or not a harness store"
            raise HarnessError(f"store {self.path}: {why} ({text})") from None

    def columns(self, table: str) -> set[str]:
        return {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}

    def migrate(self) -> None:
        """Bring an older store up to ``SCHEMA_VERSION`` in place; the rows already stored are kept."""
        if self.db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        with self.transaction() as db:  # re-checked under the write lock: another process may have migrated
            for table, column, declaration in MIGRATIONS:
                if column not in self.columns(table):
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise HarnessError(f"store {self.path} is read-only: it can be read, not written")
        for attempt in range(50):
            try:
                self.db.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.1)
        try:
            yield self.db
            pause_point("commit")
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # SQLite may have rolled back already (disk full)
                self.db.execute("ROLLBACK")
            raise

    # ---- runs ------------------------------------------------------------------------------
    @guarded
    def start_run(self, run_id: str, *, model: str, config: dict, fingerprint: dict, env: dict,
                  output_dir: str, kind: str = "eval") -> bool:
        """Create the run, or mark an existing one running again; True when it already existed."""
        now = time.time()
        with self.transaction() as db:
            existed = db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone() is not None
            if existed:
                db.execute("UPDATE runs SET status='running', updated_at=?, env=?, model_fingerprint=? WHERE run_id=?",
                           (now, json.dumps(env), json.dumps(fingerprint), run_id))
            else:
                db.execute("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?)",
                           (run_id, now, now, "running", kind, model, json.dumps(config),
                            json.dumps(fingerprint), json.dumps(env), output_dir))
        return existed

    @guarded
    def finish_run(self, run_id: str, status: str = "complete") -> None:
        """Mark the run ``complete``, or ``failed`` / ``interrupted`` when it stopped early (its
        records stay, and the same command resumes it)."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET status=?, updated_at=? WHERE run_id=?", (status, time.time(), run_id))

    @guarded
    def delete_run(self, run_id: str) -> None:
        """Remove a run, its task results, records and measurements in one transaction."""
        with self.transaction() as db:
            for table in ("records", "task_results", "measurements", "runs"):
                db.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))

    @guarded
    def runs(self, kind: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT * FROM runs" + (" WHERE kind=?" if kind else "") + " ORDER BY created_at"
        cursor = self.db.execute(query, (kind,) if kind else ())
        columns = [c[0] for c in cursor.description]
        rows = []
        for values in cursor.fetchall():
            row = dict(zip(columns, values))
            for key in ("config", "model_fingerprint", "env"):
                row[key] = json.loads(row[key])
            rows.append(row)
        return rows

    def run(self, run_id: str) -> dict[str, Any]:
        matches = [r for r in self.runs() if r["run_id"] == run_id or r["run_id"].startswith(run_id)]
        if len(matches) != 1:
            known = ", ".join(r["run_id"][:12] for r in self.runs()[-10:]) or "none"
            what = "no run" if not matches else f"{len(matches)} runs"
            raise HarnessError(f"{what} matching '{run_id}' in {self.path} (recent: {known})")
        return matches[0]

    @guarded
    def document_counts(self) -> dict[str, int]:
        """{run id: number of records stored}, for the runs that have any."""
        return dict(self.db.execute("SELECT run_id, COUNT(*) FROM records GROUP BY run_id").fetchall())

    # ---- per-example records ------------------------------------------------------------------
    @guarded
    def done_docs(self, run_id: str, task: str) -> set[int]:
        rows = self.db.execute("SELECT doc_id FROM records WHERE run_id=? AND task=?", (run_id, task))
        return {r[0] for r in rows}

    @guarded
    def add_records(self, run_id: str, task: str, items: list[tuple[int, dict, dict]],
                    keys: list[str | None] | None = None) -> None:
        """Append (doc_id, metrics, record) rows in one transaction, with their cache keys; rows
        already stored are kept."""
        keys = keys or [None] * len(items)
        with self.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO records (run_id, task, doc_id, metrics, record, cache_key) "
                           "VALUES (?,?,?,?,?,?)", [(run_id, task, doc_id, json.dumps(m), json.dumps(r), key)
                                                    for (doc_id, m, r), key in zip(items, keys)])

    @guarded
    def cached(self, keys: list[str]) -> dict[str, tuple[dict, dict]]:
        """{cache key: (metrics, record)} of the stored records with these keys (any run)."""
        found: dict[str, tuple[dict, dict]] = {}
        for start in range(0, len(keys), 500):
            part = keys[start:start + 500]
            rows = self.db.execute(f"SELECT cache_key, metrics, record FROM records WHERE cache_key IN "
                                   f"({','.join('?' * len(part))})", part)
            for key, metrics, record in rows:
                found.setdefault(key, (json.loads(metrics), json.loads(record)))
        return found

    @guarded
    def records(self, run_id: str, task: str) -> list[tuple[int, dict, dict]]:
        rows = self.db.execute("SELECT doc_id, metrics, record FROM records WHERE run_id=? AND task=? "
                               "ORDER BY doc_id", (run_id, task))
        return [(d, json.loads(m), json.loads(r)) for d, m, r in rows]

    @guarded
    def set_task_result(self, run_id: str, task: str, *, task_hash: str, prompt_hash: str, n: int,
                        metrics: dict, settings: dict, specs: list[dict], output_type: str) -> None:
        """Store a task's aggregate; ``specs`` are its metric specs (``Metrics.to_list()``)."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO task_results (run_id, task, task_hash, prompt_hash, n, metrics, "
                       "settings, metric_specs, output_type) VALUES (?,?,?,?,?,?,?,?,?)",
                       (run_id, task, task_hash, prompt_hash, n, json.dumps(metrics), json.dumps(settings),
                        json.dumps(specs), output_type))

    @guarded
    def task_results(self, run_id: str) -> dict[str, dict[str, Any]]:
        """{task: {task_hash, prompt_hash, n, metrics, settings, specs, output_type}}; ``specs`` and
        ``output_type`` are None for results stored before schema 2."""
        rows = self.db.execute("SELECT task, task_hash, prompt_hash, n, metrics, settings, metric_specs, output_type "
                               "FROM task_results WHERE run_id=? ORDER BY task", (run_id,))
        return {t: {"task_hash": th, "prompt_hash": ph, "n": n, "metrics": json.loads(m), "settings": json.loads(s),
                    "specs": None if specs is None else json.loads(specs), "output_type": kind}
                for t, th, ph, n, m, s, specs, kind in rows}

    # ---- throughput measurements ------------------------------------------------------------
    @guarded
    def add_measurement(self, run_id: str, record: dict) -> None:
        with self.transaction() as db:
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM measurements WHERE run_id=?",
                                (run_id,)).fetchone()
            db.execute("INSERT INTO measurements VALUES (?,?,?)", (run_id, seq, json.dumps(record)))

    @guarded
    def measurements(self, run_id: str) -> list[dict]:
        rows = self.db.execute("SELECT record FROM measurements WHERE run_id=? ORDER BY seq", (run_id,))
        return [json.loads(r[0]) for r in rows]


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, lambda handle: handle.write(json.dumps(data, indent=2, default=str)))


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    write_atomic(path, lambda handle: handle.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n"
                                                        for row in rows))


def write_atomic(path: Path, fill: Callable[[Any], Any]) -> None:
    """Write a temporary file with ``fill(handle)`` and rename it over ``path``; on an OSError (disk
    full, read-only) the old file stays, the temporary one goes, and a one-line HarnessError says so."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            fill(handle)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HarnessError(f"could not write {path} ({exc.strerror or exc})") from None
