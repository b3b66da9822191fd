"""The shard plan: every input item, in a fixed order, on disk (SQLite), never all in RAM.

``build_plan`` enumerates an image folder, a manifest (CSV or Parquet: item_id, path) or
WebDataset tar shards *lazily* and streams the rows into ``<out>/_plan.sqlite``:

    items(pos, item_id, source, kind, path BLOB, offset, size, status, error)

``pos`` is the item's place in the input order (a folder is ordered by relative path, byte
wise, by SQLite itself: an external sort, so a 10M-file flat folder is never a Python list;
a manifest keeps its row order; tar shards are sorted by file name, members keep tar order).
Shard ``k`` is ``pos in [k*K, (k+1)*K)``. Both engines (local, Ray) read this one plan, so a
run can be resumed by either.

Duplicate item ids are settled here, once, for the whole input: the first ``pos`` of an id is
processed, every later one gets status ``duplicate_id``. SQLite does it with a GROUP BY over an
index on disk, so memory stays flat however many ids there are (cost: the plan file, ~100
bytes per item).

Items whose status is already known at plan time (``outside_root``, ``duplicate_id``,
``missing`` path cell...) carry it in ``status``; the rest have status NULL and are decoded.
"""
from __future__ import annotations

import csv
import glob
import os
import sqlite3
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
PLAN_NAME = "_plan.sqlite"
PLAN_VERSION = 1


@dataclass
class Row:
    """One input item as the plan stores it (``path`` is bytes: file names need not be UTF-8)."""
    item_id: str
    source: str  # what a human reads in the output: relative path, tar:member, manifest path
    kind: str  # file | tar
    path: bytes  # file: relative to root; tar: the tar file's absolute path
    offset: int = 0  # tar: byte offset of the member's data
    size: int = 0  # tar: member size
    status: Optional[str] = None
    error: str = ""


class InputError(ValueError):
    """The input or its layout is unusable as a whole (bad manifest header, no such path)."""


def detect_input(path: str) -> tuple[str, list[str]]:
    """``(kind, paths)``: kind is folder | csv | parquet | tar; paths are the files/roots."""
    if any(c in path for c in "*?["):
        tars = sorted(glob.glob(path))
        if not tars:
            raise InputError(f"--input {path!r}: the pattern matches no file")
        return "tar", tars
    p = Path(path)
    if not p.exists():
        raise InputError(f"--input {path}: no such file or folder")
    if p.is_file():
        suf = p.suffix.lower()
        if suf in (".csv", ".tsv"):
            return "csv", [str(p)]
        if suf in (".parquet", ".pq"):
            return "parquet", [str(p)]
        if suf == ".tar":
            return "tar", [str(p)]
        raise InputError(f"--input {path}: expected a folder, a .csv/.tsv/.parquet manifest or a .tar shard")
    # a folder that holds tar shards and no images is a WebDataset; otherwise an image folder
    tars, images = [], False
    with os.scandir(p) as it:
        for e in it:
            low = e.name.lower()
            if low.endswith(".tar") and e.is_file():
                tars.append(e.path)
            elif low.endswith(IMAGE_EXTS) or e.is_dir(follow_symlinks=False):
                images = True
    if tars and not images:
        return "tar", sorted(tars)
    return "folder", [str(p)]


def _walk(root: str) -> Iterator[Row]:
    """Image files under ``root`` (any order; SQLite sorts them). Symlinked folders are not
    followed (loops, escapes); symlinked files are listed and checked at read time."""
    stack = [b""]
    broot = os.fsencode(root)
    while stack:
        rel = stack.pop()
        try:
            it = os.scandir(os.path.join(broot, rel) if rel else broot)
        except OSError:
            continue  # an unreadable sub-folder: nothing in it can be listed
        with it:
            for e in it:
                r = os.path.join(rel, e.name) if rel else e.name
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(r)
                        continue
                except OSError:
                    continue
                if not e.name.lower().endswith(tuple(x.encode() for x in IMAGE_EXTS)):
                    continue
                text = os.fsdecode(r).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                text = text.replace(os.sep, "/")
                yield Row(item_id=os.path.splitext(text)[0], source=text, kind="file", path=r)


def _check_rel(rel: str) -> Optional[str]:
    """Why a manifest path may not be read (None: fine). Symlinks are checked at read time."""
    if not rel:
        return "empty path"
    if "\x00" in rel:
        return "path contains NUL"
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        return f"absolute path {rel!r} is outside the catalogue root"
    if ".." in rel.replace("\\", "/").split("/"):
        return f"path {rel!r} climbs out of the catalogue root"
    return None


def _manifest_rows(kind: str, path: str, id_col: str, path_col: str) -> Iterator[Row]:
    def make(item_id, rel) -> Row:
        item_id = "" if item_id is None else str(item_id)
        rel = "" if rel is None else str(rel)
        row = Row(item_id=item_id, source=rel, kind="file", path=rel.encode("utf-8", "surrogateescape"))
        why = _check_rel(rel)
        if not item_id:
            row.status, row.error = "bad_id", "empty item_id"
        elif why:
            row.status = "missing" if why == "empty path" else "outside_root"
            row.error = why
        return row

    if kind == "csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
            cols = reader.fieldnames or []
            if id_col not in cols or path_col not in cols:
                raise InputError(f"manifest {path}: needs columns {id_col!r} and {path_col!r}, has {cols}")
            for rec in reader:
                yield make(rec.get(id_col), rec.get(path_col))
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        cols = pf.schema_arrow.names
        if id_col not in cols or path_col not in cols:
            raise InputError(f"manifest {path}: needs columns {id_col!r} and {path_col!r}, has {cols}")
        for batch in pf.iter_batches(batch_size=8192, columns=[id_col, path_col]):
            for item_id, rel in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                yield make(item_id, rel)


def _tar_rows(tars: list[str]) -> Iterator[Row]:
    """Image members of WebDataset shards: key = member path up to the first dot of its name."""
    for t in tars:
        name = os.path.basename(t)
        try:
            with tarfile.open(t, "r:") as tf:
                while True:
                    m = tf.next()
                    if m is None:
                        break
                    tf.members = []  # tarfile keeps every header it has read: keep memory flat
                    base = m.name.rsplit("/", 1)
                    stem, dot, ext = base[-1].partition(".")
                    if not dot or not ("." + ext.rsplit(".", 1)[-1].lower()) in IMAGE_EXTS:
                        continue
                    key = (base[0] + "/" + stem) if len(base) > 1 else stem
                    row = Row(item_id=key, source=f"{name}:{m.name}", kind="tar", path=os.fsencode(t),
                              offset=m.offset_data, size=m.size)
                    if not m.isreg():
                        row.status, row.error = "unreadable", "tar member is not a regular file"
                    yield row
        except (tarfile.TarError, OSError, EOFError) as e:
            yield Row(item_id=name, source=name, kind="tar", path=os.fsencode(t), status="unreadable",
                      error=f"tar shard {name}: {type(e).__name__}: {e}")


def plan_path(out: str | Path) -> Path:
    return Path(out) / PLAN_NAME


def build_plan(out: str | Path, input_path: str, id_col: str = "item_id", path_col: str = "path",
               root: Optional[str] = None) -> tuple[Path, dict]:
    """Write ``<out>/_plan.sqlite`` (atomically: a temp file renamed when complete).

    Returns ``(plan_file, meta)``; meta has kind, root (folder reads resolve under it), n.
    """
    kind, paths = detect_input(input_path)
    if kind == "folder":
        root_dir, rows = paths[0], _walk(paths[0])
    elif kind in ("csv", "parquet"):
        root_dir = root or str(Path(paths[0]).parent)
        rows = _manifest_rows(kind, paths[0], id_col, path_col)
    else:
        root_dir, rows = root or str(Path(paths[0]).parent), _tar_rows(paths)
    root_dir = os.path.realpath(root_dir)
    final = plan_path(out)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{PLAN_NAME}.{os.getpid()}.tmp")
    if tmp.exists():
        tmp.unlink()
    db = sqlite3.connect(tmp)
    db.executescript("""
        PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16000;
        CREATE TABLE staging(seq INTEGER PRIMARY KEY, item_id TEXT, source TEXT, kind TEXT, path BLOB,
                             offset INT, size INT, status TEXT, error TEXT);
        CREATE TABLE items(pos INTEGER PRIMARY KEY, item_id TEXT, source TEXT, kind TEXT, path BLOB,
                           offset INT, size INT, status TEXT, error TEXT);
        CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);
    """)
    chunk: list[tuple] = []
    for r in rows:
        chunk.append((r.item_id, r.source, r.kind, r.path, r.offset, r.size, r.status, r.error))
        if len(chunk) >= 4096:
            db.executemany("INSERT INTO staging(item_id,source,kind,path,offset,size,status,error) "
                           "VALUES (?,?,?,?,?,?,?,?)", chunk)
            chunk.clear()
    if chunk:
        db.executemany("INSERT INTO staging(item_id,source,kind,path,offset,size,status,error) "
                       "VALUES (?,?,?,?,?,?,?,?)", chunk)
    order = "path" if kind == "folder" else "seq"  # folders: byte-wise relative path
    db.execute(f"INSERT INTO items(pos,item_id,source,kind,path,offset,size,status,error) "
               f"SELECT ROW_NUMBER() OVER (ORDER BY {order}) - 1, item_id, source, kind, path, offset, size, "
               f"status, error FROM staging ORDER BY {order}")
    db.execute("DROP TABLE staging")
    db.execute("CREATE INDEX ids ON items(item_id, pos)")
    # first occurrence (lowest pos) of an id wins, whatever its own status turns out to be
    db.execute("""UPDATE items SET status='duplicate_id',
                  error='item id already used at input position ' || (
                      SELECT MIN(b.pos) FROM items b WHERE b.item_id = items.item_id)
                  WHERE item_id != '' AND pos > (SELECT MIN(b.pos) FROM items b WHERE b.item_id = items.item_id)""")
    n = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    meta = {"version": str(PLAN_VERSION), "kind": kind, "root": root_dir, "input": os.path.abspath(input_path),
            "n": str(n)}
    db.executemany("INSERT INTO meta VALUES (?,?)", list(meta.items()))
    db.commit()
    db.close()
    os.replace(tmp, final)
    return final, read_meta(final)


def read_meta(plan_file: str | Path) -> dict:
    db = sqlite3.connect(f"file:{plan_file}?mode=ro", uri=True)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    finally:
        db.close()
    meta["n"] = int(meta["n"])
    return meta


class PlanReader:
    """Read-only access to plan rows by position range; one SQLite connection per process
    (a connection must not cross a fork, so it is opened lazily in whichever process reads)."""

    def __init__(self, plan_file: str | Path):
        self.plan_file = str(plan_file)
        self._db = None
        self._pid = None

    def rows(self, start: int, stop: int) -> list[Row]:
        if self._db is None or self._pid != os.getpid():
            self._db = sqlite3.connect(f"file:{self.plan_file}?mode=ro", uri=True, check_same_thread=False)
            self._pid = os.getpid()
        cur = self._db.execute("SELECT item_id, source, kind, path, offset, size, status, error FROM items "
                               "WHERE pos >= ? AND pos < ? ORDER BY pos", (start, stop))
        return [Row(item_id=a, source=b, kind=c, path=bytes(d), offset=e, size=f, status=g, error=h or "")
                for a, b, c, d, e, f, g, h in cur]

    def __getstate__(self):  # picklable for DataLoader workers / Ray tasks: drop the connection
        return {"plan_file": self.plan_file, "_db": None, "_pid": None}
