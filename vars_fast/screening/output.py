"""Output layout of a screening run, shared by the local and the Ray engine.

    <out>/part-00000.parquet ...   one row per input item, in input order (schema: SCHEMA)
    <out>/_done/part-00000.json    the shard's done-marker: counts, distance range, timing
    <out>/_plan.sqlite             the shard plan (plan.py)
    <out>/_run.json                settings a resume must match
    <out>/summary.json             counts by status, flagged rate, throughput, config, versions
    <out>/score_histogram.png      detector distances of ok items, with the threshold
    <out>/denoised/<quoted id>.png with --write-denoised

A shard is done when its marker exists. The Parquet file is renamed into place *before* the
marker is written (both atomically), so a kill between the two only redoes that shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import urllib.parse
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vars_fast.io import atomic_write_bytes, atomic_write_json

SCHEMA = pa.schema([
    ("pos", pa.int64()),  # place in the input order (the plan's pos)
    ("item_id", pa.string()),
    ("source", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("distance", pa.float32()),  # null unless status == ok
    ("flagged", pa.bool_()),  # null unless status == ok
    ("feature", pa.list_(pa.float32())),  # null unless status == ok
])


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def marker_path(out: Path, shard: int) -> Path:
    return out / "_done" / f"part-{shard:05d}.json"


class ShardBuffer:
    """Columns of one shard, filled batch by batch, written atomically when complete."""

    def __init__(self, shard: int):
        self.shard = shard
        self.cols: dict[str, list] = {f.name: [] for f in SCHEMA}

    def add(self, pos, item_id, source, status, error, distance=None, flagged=None, feature=None) -> None:
        """Lists of one batch; ``distance``/``flagged``/``feature`` (numpy, rows of ok items in
        order) are spread onto the rows whose status is ok, null elsewhere."""
        c, k = self.cols, 0
        for i in range(len(pos)):
            c["pos"].append(int(pos[i]))
            c["item_id"].append(item_id[i])
            c["source"].append(source[i])
            c["status"].append(status[i])
            c["error"].append(error[i] or None)
            if status[i] == "ok":
                c["distance"].append(float(distance[k]))
                c["flagged"].append(bool(flagged[k]))
                c["feature"].append(feature[k])
                k += 1
            else:
                c["distance"].append(None)
                c["flagged"].append(None)
                c["feature"].append(None)

    def __len__(self) -> int:
        return len(self.cols["pos"])

    def table(self) -> pa.Table:
        c = self.cols
        feats = c["feature"]
        dim = next((len(f) for f in feats if f is not None), 0)
        # build the list column from one flat float32 buffer: no per-float Python objects
        offsets = np.zeros(len(feats) + 1, dtype=np.int32)
        offsets[1:] = np.cumsum([0 if f is None else dim for f in feats])
        flat = np.concatenate([np.asarray(f, np.float32) for f in feats if f is not None]) if dim else \
            np.zeros(0, np.float32)
        mask = pa.array([f is None for f in feats])
        feature = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()), mask=mask)
        arrays = [pa.array(c["pos"], pa.int64()), pa.array(c["item_id"], pa.string()),
                  pa.array(c["source"], pa.string()), pa.array(c["status"], pa.string()),
                  pa.array(c["error"], pa.string()), pa.array(c["distance"], pa.float32()),
                  pa.array(c["flagged"], pa.bool_()), feature]
        return pa.Table.from_arrays(arrays, schema=SCHEMA)

    def write(self, out: Path, seconds: float) -> dict:
        """Parquet (atomic) then marker (atomic); returns the marker dict."""
        tab = self.table()
        buf = io.BytesIO()
        pq.write_table(tab, buf, compression="zstd")
        atomic_write_bytes(out / part_name(self.shard), buf.getvalue())
        st = self.cols["status"]
        d = [x for x in self.cols["distance"] if x is not None]
        counts: dict[str, int] = {}
        for s in st:
            counts[s] = counts.get(s, 0) + 1
        marker = {"shard": self.shard, "rows": len(st), "first_pos": self.cols["pos"][0] if st else None,
                  "counts": counts, "flagged": int(sum(1 for f in self.cols["flagged"] if f)),
                  "dist_min": min(d) if d else None, "dist_max": max(d) if d else None,
                  "seconds": seconds, "sha1": hashlib.sha1(buf.getvalue()).hexdigest()}
        atomic_write_json(marker_path(out, self.shard), marker)
        return marker


def denoised_name(item_id: str) -> str:
    """A flat, safe file name for an item id (ids may hold '/', '..', NUL...)."""
    q = urllib.parse.quote(item_id, safe="")
    if len(q) > 180 or q in ("", ".", ".."):
        q = q[:120] + "-" + hashlib.sha1(item_id.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return q + ".png"


def write_denoised(out: Path, item_ids: list[str], images: np.ndarray) -> None:
    """uint8 [B, 3, S, S] -> ``<out>/denoised/<quoted id>.png`` (atomic each)."""
    from PIL import Image

    d = out / "denoised"
    for item_id, img in zip(item_ids, images):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(buf, format="PNG")
        atomic_write_bytes(d / denoised_name(item_id), buf.getvalue())


def iter_column(out: Path, n_shards: int, column: str):
    """One shard's column at a time (bounded memory)."""
    for k in range(n_shards):
        p = out / part_name(k)
        if p.is_file():
            yield pq.read_table(p, columns=[column, "flagged"])


def summarise(out: Path, n_shards: int, threshold: float, config: dict, versions: dict,
              images_per_s: Optional[float], seconds: float) -> dict:
    """Aggregate the markers into summary.json and draw score_histogram.png (two streaming passes
    over the distance column: range from the markers, then fixed-bin counts per shard)."""
    counts: dict[str, int] = {}
    rows = flagged = 0
    lo, hi = np.inf, -np.inf
    for k in range(n_shards):
        m = json.loads(marker_path(out, k).read_text())
        rows += m["rows"]
        flagged += m["flagged"]
        for s, c in m["counts"].items():
            counts[s] = counts.get(s, 0) + c
        if m["dist_min"] is not None:
            lo, hi = min(lo, m["dist_min"]), max(hi, m["dist_max"])
    ok = counts.get("ok", 0)
    summary = {"rows": rows, "counts": dict(sorted(counts.items())), "ok": ok, "flagged": flagged,
               "flagged_rate": flagged / ok if ok else 0.0, "threshold": threshold, "shards": n_shards,
               "images_per_s": images_per_s, "seconds": seconds, "config": config, "versions": versions}
    if ok:
        lo, hi = min(lo, threshold), max(hi, threshold)
        edges = np.linspace(lo, hi + 1e-6 * max(1.0, abs(hi)), 51)
        h_clean, h_flag = np.zeros(50, np.int64), np.zeros(50, np.int64)
        for tab in iter_column(out, n_shards, "distance"):
            d = tab.column(0).to_numpy(zero_copy_only=False)
            f = tab.column(1).to_numpy(zero_copy_only=False)
            keep = ~np.isnan(d.astype(np.float64))
            d, f = d[keep], f[keep].astype(bool)
            h_clean += np.histogram(d[~f], edges)[0]
            h_flag += np.histogram(d[f], edges)[0]
        summary["histogram"] = {"edges": edges.tolist(), "clean": h_clean.tolist(), "flagged": h_flag.tolist()}
        _plot(out / "score_histogram.png", edges, h_clean, h_flag, threshold)
    atomic_write_json(out / "summary.json", summary)
    return summary


def _plot(path: Path, edges, h_clean, h_flag, threshold) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    w = np.diff(edges)
    ax.bar(edges[:-1], h_clean, width=w, align="edge", label="not flagged", color="#4c72b0")
    ax.bar(edges[:-1], h_flag, width=w, align="edge", bottom=h_clean, label="flagged", color="#dd8452")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3g}")
    ax.set_xlabel("detector distance ||z(x) - z(D(x))||")
    ax.set_ylabel("items")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
