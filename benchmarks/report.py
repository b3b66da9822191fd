"""Ratio tables from a pytest-benchmark JSON (see benchmarks/conftest.py for the convention).

    python benchmarks/report.py benchmarks/results/cpu.json [--suffix NAME] [--out-dir DIR]

Prints, and saves as ``benchmarks/results/<device>.md`` + ``<device>.json``, one table per
(op, shape): median time per provider, speed-up of every non-baseline provider against each
baseline present (``eager``, ``eager_*``, ``compile``), achieved GB/s and GFLOP/s as a share of
the machine's copy bandwidth / fp32 matmul peak measured in the same run, and peak memory.
End-to-end rows (no bytes/flops) show their throughput fields (``*_per_s``) instead.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
USAGE = "usage: python benchmarks/report.py BENCHMARK.json [--suffix NAME] [--out-dir DIR]"


def _is_baseline(p: str) -> bool:
    return p == "eager" or p.startswith("eager_") or p == "compile"


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.3f}" if s < 0.01 else f"{s * 1e3:.1f}"


def rows_from(data: dict) -> list[dict]:
    rows = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info", {}))
        params = b.get("params") or {}
        info.setdefault("provider", params.get("provider", b.get("name")))
        info.setdefault("op", b.get("group") or b["name"].split("[")[0].removeprefix("test_"))
        info.setdefault("shape", "-")
        info["median_s"] = b["stats"]["median"]
        info["name"] = b["name"]
        rows.append(info)
    return rows


def tables(rows: list[dict], machine: dict) -> tuple[str, list[dict]]:
    copy_gbps, mm_gflops = machine.get("copy_gbps"), machine.get("matmul_gflops")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["shape"])].append(r)
    md, out = [], []
    for (op, shape), rs in sorted(groups.items()):
        base = {r["provider"]: r["median_s"] for r in rs if _is_baseline(r["provider"])}
        extra_keys = sorted({k for r in rs for k in r if k.endswith("_per_s") or k.startswith("paired_")})
        head = ["provider", "median ms"] + [f"vs {b}" for b in base] + ["GB/s", "% copy BW", "GFLOP/s", "% mm peak",
                                                                          "peak MB"] + extra_keys
        md += [f"### {op} {shape}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in sorted(rs, key=lambda r: (not _is_baseline(r["provider"]), r["provider"])):
            t = r["median_s"]
            gbps = r.get("bytes", 0) / t / 1e9 if r.get("bytes") else None
            gflops = r.get("flops", 0) / t / 1e9 if r.get("flops") else None
            ratios = {b: bt / t for b, bt in base.items()}
            rec = dict(op=op, shape=shape, provider=r["provider"], median_ms=t * 1e3, gbps=gbps,
                       pct_copy_bw=100 * gbps / copy_gbps if gbps and copy_gbps else None, gflops=gflops,
                       pct_matmul_peak=100 * gflops / mm_gflops if gflops and mm_gflops else None,
                       peak_mem_mb=r.get("peak_mem_mb"), speedup={f"vs_{b}": x for b, x in ratios.items()},
                       **{k: r[k] for k in extra_keys if k in r})
            out.append(rec)
            cells = [r["provider"], _fmt_ms(t)] + [f"{ratios[b]:.2f}x" for b in base]
            cells += [f"{gbps:.1f}" if gbps else "-", f"{rec['pct_copy_bw']:.0f}%" if rec["pct_copy_bw"] else "-",
                      f"{gflops:.1f}" if gflops else "-", f"{rec['pct_matmul_peak']:.0f}%" if rec["pct_matmul_peak"] else "-",
                      f"{r['peak_mem_mb']:.1f}" if r.get("peak_mem_mb") is not None else "-"]
            cells += [f"{r[k]:.2f}" if isinstance(r.get(k), (int, float)) else "-" for k in extra_keys]
            md.append("| " + " | ".join(cells) + " |")
        md.append("")
    return "\n".join(md), out


def main(argv: list[str]) -> int:
    """``--suffix NAME`` saves ``<device>-NAME.md/.json`` (a partial re-run beside the full table);
    ``--out-dir DIR`` saves there instead of ``benchmarks/results``."""
    if "-h" in argv or "--help" in argv:
        print(USAGE + "\n\n" + __doc__.split("\n\n")[0])
        return 0
    opts = {"--suffix": "", "--out-dir": os.path.join(HERE, "results")}
    for name in opts:
        if name in argv:
            i = argv.index(name)
            if i + 1 >= len(argv):
                print(f"report.py: {name} needs a value", file=sys.stderr)
                return 2
            opts[name], argv = argv[i + 1], argv[:i] + argv[i + 2:]
    suffix, out_dir = opts["--suffix"], opts["--out-dir"]
    if len(argv) != 1:
        print(USAGE + "\n" + __doc__)
        return 2
    path = argv[0]
    try:
        data = json.load(open(path))
    except (OSError, json.JSONDecodeError) as e:
        print(f"report.py: cannot read benchmark JSON {path!r}: {e}", file=sys.stderr)
        return 1
    machine = data.get("machine_info", {}).get("vars_fast", {})
    body, recs = tables(rows_from(data), machine)
    dev = machine.get("device_name", data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "unknown"))
    header = [f"# Benchmarks on {dev}", "",
              f"- torch {machine.get('torch')}, triton {machine.get('triton')}, CUDA {machine.get('cuda')}, "
              f"threads {machine.get('threads')}, extension loaded: {machine.get('ext_loaded')}",
              f"- measured in this run: copy bandwidth {machine.get('copy_gbps')} GB/s (read + write), "
              f"fp32 matmul {machine.get('matmul_gflops')} GFLOP/s",
              f"- source: {os.path.basename(path)} ({data.get('datetime', '')})", "",
              "Speed-ups are baseline time / provider time (> 1 = faster than the baseline).", ""]
    text = "\n".join(header) + body
    print(text)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{machine.get('device', 'dev')}-{dev}".lower()).strip("-")[:80]
    if suffix:
        slug += "-" + re.sub(r"[^a-z0-9]+", "-", suffix.lower()).strip("-")
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, slug)
    with open(base + ".md", "w") as f:
        f.write(text + "\n")
    with open(base + ".json", "w") as f:
        json.dump(dict(machine=machine, rows=recs), f, indent=1)
    print(f"saved {base}.md and {base}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
