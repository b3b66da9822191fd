"""Screening at scale on this machine: throughput, peak RSS at two catalogue sizes, status
counts, and kill -9 half way + resume == an uninterrupted run.

    python benchmarks/screen_scale.py --checkpoint RUN_FOLDER_OR_defense.pt --work /tmp/screen_scale \
        [--n 20000] [--small 5000] [--adv-from RUN_FOLDER] [--out benchmarks/results/screening_cpu]

The catalogue (written once under --work, reused): ``n`` synthetic product photos as JPEG
(``vars_fast.data.synthetic.write_image_folder``, seed 0, 64 px), and, with ``--adv-from``, the
run's attacked catalogues (``attacks/VBPR_<method>_eps<e>.npy``, lossless PNG, ids
``adv-<method><e>-<i>``) plus a few broken files (empty, truncated JPEG, text, a directory
named like an image) so that every status shows up in the counts. Items are screened in
file-name order: the attacked ones come first (``adv-`` < ``item``).

Runs (each a fresh ``python -m vars_fast.screen`` process tree; RSS = main process + DataLoader
workers, sampled every 0.25 s with psutil):
  1. the whole catalogue, uninterrupted;
  2. the first ``small`` items (``--limit``) uninterrupted: peak RSS must not grow with N;
  3. the whole catalogue again, killed with SIGKILL to its process group when half of its
     shards are done, then the same command again (resume): every Parquet part must equal
     run 1's, row for row and column for column.
Writes ``<out>.md`` and ``<out>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]


def make_catalogue(folder: Path, n: int, adv_from: Path | None, size: int) -> dict:
    from PIL import Image

    from vars_fast.data.synthetic import write_image_folder

    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "_complete.json"
    if stamp.is_file():
        return json.loads(stamp.read_text())
    t0 = time.perf_counter()
    write_image_folder(folder, n, size=size, seed=0, fmt="jpg")
    info = {"clean_jpeg": n, "adversarial_png": {}, "broken": 0}
    if adv_from is not None:
        for f in sorted((adv_from / "attacks").glob("VBPR_*_eps*.npy")):
            method, eps = f.stem.split("_")[1], f.stem.split("eps")[-1]
            if method not in ("fgsm", "pgd") or eps not in ("8", "16"):
                continue
            a = np.load(f)
            for i in range(a.shape[0]):
                Image.fromarray(a[i].transpose(1, 2, 0)).save(folder / f"adv-{method}{eps}-{i:05d}.png")
            info["adversarial_png"][f"{method}{eps}"] = int(a.shape[0])
    good = next(folder.glob("item*.jpg")).read_bytes()
    broken = {"bad-empty.jpg": b"", "bad-truncated.jpg": good[: len(good) // 3], "bad-text.png": b"not an image\n",
              "bad-random.webp": os.urandom(2048)}
    for name, data in broken.items():
        (folder / name).write_bytes(data)
    (folder / "bad-dir.jpg").mkdir(exist_ok=True)
    info["broken"] = len(broken) + 1
    info["write_seconds"] = round(time.perf_counter() - t0, 1)
    stamp.write_text(json.dumps(info))
    return info


def tree_rss(p: psutil.Process) -> tuple[int, int]:
    try:
        main = p.memory_info().rss
        kids = sum(c.memory_info().rss for c in p.children(recursive=True))
        return main, main + kids
    except psutil.Error:
        return 0, 0


def screen(cmd: list[str], out: Path, kill_after_shards: int | None = None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    ps = psutil.Process(proc.pid)
    peak_main = peak_tree = 0
    killed = False
    while proc.poll() is None:
        m, t = tree_rss(ps)
        peak_main, peak_tree = max(peak_main, m), max(peak_tree, t)
        if kill_after_shards is not None and len(list((out / "_done").glob("*.json"))) >= kill_after_shards:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            proc.wait()
            break
        time.sleep(0.25)
    err = proc.stderr.read().decode(errors="replace")
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"screen failed (rc {proc.returncode}):\n{err[-3000:]}")
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_main_mb": round(peak_main / 2**20),
            "peak_rss_tree_mb": round(peak_tree / 2**20), "killed": killed,
            "shards_done": len(list((out / "_done").glob("*.json")))}


def parts_equal(a: Path, b: Path) -> tuple[bool, int]:
    import pyarrow.parquet as pq

    pa_, pb = sorted(a.glob("part-*.parquet")), sorted(b.glob("part-*.parquet"))
    if [p.name for p in pa_] != [p.name for p in pb]:
        return False, 0
    rows = 0
    for x, y in zip(pa_, pb):
        tx, ty = pq.read_table(x), pq.read_table(y)
        if not tx.equals(ty):
            return False, rows
        rows += tx.num_rows
    return True, rows


def flagged_by_source(out: Path) -> dict:
    import pyarrow.parquet as pq

    res: dict[str, dict] = {}
    for p in sorted(out.glob("part-*.parquet")):
        t = pq.read_table(p, columns=["item_id", "status", "flagged"]).to_pydict()
        for iid, st, fl in zip(t["item_id"], t["status"], t["flagged"]):
            src = iid.split("-")[0] + ("-" + iid.split("-")[1] if iid.startswith("adv-") else "")
            src = "clean" if iid.startswith("item") else src
            r = res.setdefault(src, {"items": 0, "ok": 0, "flagged": 0})
            r["items"] += 1
            r["ok"] += st == "ok"
            r["flagged"] += bool(fl)
    return res


def to_markdown(r: dict, command: str) -> str:
    runs, cat = r["runs"], r["catalogue"]
    lines = [f"# Screening at scale on CPU ({r['machine']['cpu']}, {r['machine']['cores']} cores)", "",
             f"Command: `{command}` (`benchmarks/screen_scale.py`).", "",
             f"Catalogue: {cat['items']} files — {cat['clean_jpeg']} clean synthetic JPEGs (64 px), "
             + ", ".join(f"{v} {k.upper()} adversarial PNGs" for k, v in cat["adversarial_png"].items())
             + f", {cat['broken']} broken entries. Settings: batch {r['settings']['batch_size']}, "
             f"{r['settings']['workers']} decode worker(s), {r['settings']['threads']} model threads, "
             f"shards of {r['settings']['shard_size']}. torch {r['versions']['torch']}.", "",
             "| run | items | images/s | wall s | peak RSS main MB | peak RSS tree MB |", "|---|---|---|---|---|---|"]
    for name, label in (("full", "whole catalogue, uninterrupted"), ("small", f"first {r['settings']['small']} items"),
                        ("killed", "whole catalogue, SIGKILL at half the shards"), ("resumed", "same command again (resume)")):
        x = runs[name]
        ips = f"{x['images_per_s']:.1f}" if x.get("images_per_s") else ""
        items = x.get("rows", f"{x['shards_done']} shards done")
        lines.append(f"| {label} | {items} | {ips} | {x['seconds']} | {x['peak_rss_main_mb']} | {x['peak_rss_tree_mb']} |")
    lines += ["", f"Status counts (whole catalogue): {runs['full']['counts']}; flagged {runs['full']['flagged']} "
              f"(threshold {runs['full']['threshold']:.4g}).", "",
              "| source | items | ok | flagged | flagged rate |", "|---|---|---|---|---|"]
    for src, v in sorted(r["flagged_by_source"].items()):
        rate = v["flagged"] / v["ok"] if v["ok"] else float("nan")
        lines.append(f"| {src} | {v['items']} | {v['ok']} | {v['flagged']} | {rate:.3f} |")
    lines += ["", f"Kill -9 + resume identical to the uninterrupted run (every Parquet part, every column, "
              f"{r['rows_compared']} rows): **{r['resume_identical']}**.",
              f"Load average at the end: {', '.join(f'{v:.2f}' for v in r['machine']['load_avg_at_end'])}.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--work", default="/tmp/screen_scale")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--small", type=int, default=5000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--adv-from", default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "screening_cpu"))
    args = ap.parse_args()

    work = Path(args.work)
    folder = work / "catalogue"
    info = make_catalogue(folder, args.n, Path(args.adv_from) if args.adv_from else None, args.size)
    n_total = sum(1 for _ in folder.iterdir()) - 1  # minus the stamp
    base = [sys.executable, "-m", "vars_fast.screen", "--input", str(folder), "--checkpoint", args.checkpoint,
            "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--threads", str(args.threads),
            "--shard-size", str(args.shard_size), "--no-progress"]
    runs = {}
    import shutil

    for name, extra, kill in (("full", [], None), ("small", ["--limit", str(args.small)], None),
                              ("killed", [], "half"), ("resumed", [], None)):
        out = work / ("full" if name == "full" else "small" if name == "small" else "kill")
        if name in ("full", "small", "killed"):
            shutil.rmtree(out, ignore_errors=True)
        n_shards = -(-n_total // args.shard_size)
        r = screen(base + ["--out", str(out)] + extra, out, kill_after_shards=n_shards // 2 if kill else None)
        if name != "killed":
            s = json.loads((out / "summary.json").read_text())
            r.update(rows=s["rows"], counts=s["counts"], flagged=s["flagged"], images_per_s=s["images_per_s"],
                     threshold=s["threshold"])
        runs[name] = r
        print(name, json.dumps(r), flush=True)
    same, rows = parts_equal(work / "full", work / "kill")
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "load_avg_at_end": os.getloadavg()},
              "catalogue": {**info, "items": n_total}, "settings": vars(args), "runs": runs,
              "resume_identical": same, "rows_compared": rows, "flagged_by_source": flagged_by_source(work / "full")}
    import torch

    result["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    Path(args.out + ".md").write_text(to_markdown(result, " ".join(["python"] + sys.argv)))
    print(json.dumps(result, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
