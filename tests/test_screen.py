"""python -m vars_fast.screen: inputs, output schema, model path, resume after kill -9."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from vars_fast.data.synthetic import write_image_folder, write_tar_shards
from vars_fast.screen import main, screen
from screen_fixtures import make_checkpoint
from vars_fast.screening.model import Screener
from vars_fast.screening.output import SCHEMA, denoised_name

SIZE = 32
os.environ.setdefault("VARS_FAST_PROGRESS", "0")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # NOTE: on a shared, oversubscribed 2-core box one intra-op thread was ~20x faster than two
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "defense.pt", image_size=SIZE, width=8, n_res_blocks=1,
                           calibrate=16)


@pytest.fixture(scope="module")
def screener(ckpt) -> Screener:
    return Screener.from_checkpoint(ckpt, "cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    write_image_folder(root, 20, size=40, fmt="mixed")
    write_image_folder(root / "sub" / "deeper", 6, size=40, fmt="jpg", start=100)
    (root / "notes.txt").write_text("not an image, not an item")
    return root


def read_out(out: Path):
    parts = sorted(out.glob("part-*.parquet"))
    return pq.read_table(parts).to_pydict() if parts else {}


def test_folder_end_to_end(ckpt, screener, folder, tmp_path):
    out = tmp_path / "out"
    s = screen(str(folder), str(ckpt), str(out), batch_size=4, shard_size=10, workers=2, screener=screener)
    t = read_out(out)
    assert pq.read_schema(out / "part-00000.parquet").remove_metadata().equals(SCHEMA)
    assert s["rows"] == len(t["item_id"]) == 26 and s["counts"] == {"ok": 26}
    assert t["pos"] == list(range(26))
    # recursive, sorted by relative path; id = relative path without suffix
    assert t["item_id"][:2] == ["item0000000", "item0000001"] and t["item_id"][-1] == "sub/deeper/item0000105"
    assert t["source"][1] == "item0000001.png"
    assert all(len(f) == screener.backbone.feature_dim for f in t["feature"])
    assert 0 < s["flagged"] < 26  # the fixture's threshold is a median: both classes occur
    assert s["flagged"] == sum(t["flagged"]) and s["shards"] == 3
    assert all((d > s["threshold"]) == f for d, f in zip(t["distance"], t["flagged"]))
    assert (out / "score_histogram.png").stat().st_size > 1000
    assert s["images_per_s"] > 0 and s["versions"]["torch"] == torch.__version__ and s["versions"]["cpu"]


def test_screener_matches_defense_detect(screener):
    from vars_fast.data.synthetic import SyntheticCatalogue

    imgs = SyntheticCatalogue(size=SIZE).render_many(range(6))
    dist, flagged, feat, _ = screener(imgs)
    x = torch.from_numpy(imgs).float() / 255
    with torch.no_grad():
        d_ref, f_ref = screener.defense.detect(x)
        feat_ref = screener.backbone.features(screener.defense.purify(x))
    torch.testing.assert_close(torch.from_numpy(dist), d_ref, rtol=1e-5, atol=1e-6)
    assert flagged.tolist() == f_ref.tolist()
    torch.testing.assert_close(torch.from_numpy(feat), feat_ref, rtol=1e-4, atol=1e-5)


def test_inference_rewrites_keep_the_checkpoints_function(ckpt, screener):
    """The screener's rewritten models (BN folded, strided "same" pads dropped, polyphase output
    conv) give the checkpoint's models' distances and features, even and odd image sizes."""
    from vars_fast.data.synthetic import SyntheticCatalogue
    from vars_fast.screening.model import Screener

    plain = Screener.from_checkpoint(ckpt, "cpu", fold_bn=False)
    assert set(screener.folded) == {"detector", "backbone", "denoiser"} and plain.folded == {}
    imgs = SyntheticCatalogue(size=SIZE).render_many(range(6))
    for x in (imgs, imgs[:, :, :SIZE - 1, :SIZE - 3]):  # odd sizes: polyphase falls back, pads differ
        d_fast, fl_fast, f_fast, _ = screener(x)
        d_ref, fl_ref, f_ref, _ = plain(x)
        torch.testing.assert_close(torch.from_numpy(d_fast), torch.from_numpy(d_ref), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(f_fast), torch.from_numpy(f_ref), rtol=1e-4, atol=1e-4)
        assert fl_fast.tolist() == fl_ref.tolist()


def test_batch_parallel_threads_write_the_same_shards(ckpt, screener, folder, tmp_path):
    """batch_threads > 1 runs batches concurrently (one intra-op thread each) and consumes them
    in order: the same rows, bit for bit, as the sequential loop, and the thread count is restored."""
    kw = dict(batch_size=3, shard_size=7, workers=1, screener=screener)
    seq = screen(str(folder), str(ckpt), str(tmp_path / "seq"), batch_threads=1, **kw)
    n = torch.get_num_threads()
    par = screen(str(folder), str(ckpt), str(tmp_path / "par"), batch_threads=3, **kw)
    assert torch.get_num_threads() == n
    assert par["config"]["batch_threads"] == 3 and seq["config"]["batch_threads"] == 1
    assert read_out(tmp_path / "par") == read_out(tmp_path / "seq")
    assert par["counts"] == seq["counts"] and par["flagged"] == seq["flagged"]


def test_manifest_csv_parquet_and_tar_agree(ckpt, screener, folder, tmp_path):
    import pyarrow as pa

    rels = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("item*.*"))[:12]
    ids = [f"sku/{i}" for i in range(len(rels))]  # ids with path separators are just ids
    (folder.parent / "m.csv").write_text("item_id,path\n" + "".join(f"{i},{r}\n" for i, r in zip(ids, rels)))
    pq.write_table(pa.table({"item_id": ids, "path": rels}), folder.parent / "m.parquet")
    res = {}
    for name in ("m.csv", "m.parquet"):
        out = tmp_path / name
        screen(str(folder.parent / name), str(ckpt), str(out), root=str(folder), batch_size=5, shard_size=7,
               workers=0, screener=screener)
        res[name] = read_out(out)
    assert res["m.csv"] == res["m.parquet"]
    assert res["m.csv"]["item_id"] == ids and set(res["m.csv"]["status"]) == {"ok"}
    # the same images through a folder run: same distances
    out = tmp_path / "folder"
    screen(str(folder), str(ckpt), str(out), batch_size=5, shard_size=7, workers=0, screener=screener)
    read_out_folder = read_out(out)
    by_src = dict(zip(read_out_folder["source"], read_out_folder["distance"]))
    np.testing.assert_allclose(res["m.csv"]["distance"], [by_src[r] for r in rels], rtol=1e-5, atol=1e-6)
    # tar shards (WebDataset layout)
    shards = tmp_path / "shards"
    write_tar_shards(shards, 9, per_shard=4, size=40)
    s = screen(str(shards), str(ckpt), str(tmp_path / "tar_out"), batch_size=4, shard_size=5, workers=2,
               screener=screener)
    t = read_out(tmp_path / "tar_out")
    assert t["item_id"] == [f"item{i:07d}" for i in range(9)] and s["counts"] == {"ok": 9}
    assert t["source"][4] == "shard-000001.tar:item0000004.jpg"


def test_limit_resume_and_settings_guard(ckpt, screener, folder, tmp_path):
    out = tmp_path / "out"
    s = screen(str(folder), str(ckpt), str(out), limit=13, batch_size=4, shard_size=10, screener=screener, workers=0)
    assert s["rows"] == 13
    s2 = screen(str(folder), str(ckpt), str(out), batch_size=4, shard_size=10, screener=screener, workers=0)
    assert s2["rows"] == 26 and s2["config"]["resumed_shards"] == 1  # shard 1 was cut by --limit: redone
    full = read_out(out)
    ref = tmp_path / "ref"
    screen(str(folder), str(ckpt), str(ref), batch_size=4, shard_size=10, screener=screener, workers=2)
    assert read_out(ref) == full
    with pytest.raises(ValueError, match="shard_size"):
        screen(str(folder), str(ckpt), str(out), batch_size=4, shard_size=8, screener=screener)


def test_write_denoised_safe_names(ckpt, screener, folder, tmp_path):
    out = tmp_path / "out"
    screen(str(folder), str(ckpt), str(out), limit=3, batch_size=4, shard_size=10, screener=screener,
           workers=0, write_denoised=True)
    screener.keep_denoised = False
    files = sorted(p.name for p in (out / "denoised").iterdir())
    assert files == [denoised_name(f"item000000{i}") for i in range(3)]
    assert denoised_name("../../etc/x") == "..%2F..%2Fetc%2Fx.png" and "/" not in denoised_name("a/b")


def test_cli_errors_are_messages(ckpt, tmp_path, capsys):
    assert main(["--input", str(tmp_path / "nope"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("id,file\nx,y.jpg\n")
    assert main(["--input", str(bad), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o2")]) == 2
    assert "needs columns 'item_id' and 'path'" in capsys.readouterr().err


def test_kill_9_then_resume_is_identical(ckpt, screener, folder, tmp_path):
    """A CLI run SIGKILLed after its second finished shard, then re-run, equals a clean run."""
    cmd = [sys.executable, "-m", "vars_fast.screen", "--input", str(folder), "--checkpoint", str(ckpt),
           "--batch-size", "2", "--shard-size", "4", "--workers", "0", "--threads", "1", "--no-progress"]
    env = dict(os.environ)  # same op backends as the in-process reference run below
    out = tmp_path / "killed"
    p = subprocess.Popen(cmd + ["--out", str(out)], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "_done" / "part-00001.json").exists():
        if p.poll() is not None:
            break
        time.sleep(0.02)
    assert p.poll() is None, "finished before it could be killed: make the catalogue bigger"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    n_done = len(list((out / "_done").glob("*.json")))
    assert 2 <= n_done < 7
    subprocess.run(cmd + ["--out", str(out)], env=env, check=True, stderr=subprocess.DEVNULL)
    ref = tmp_path / "ref"  # uninterrupted, in-process, same batches and thread count
    screen(str(folder), str(ckpt), str(ref), batch_size=2, shard_size=4, workers=0, screener=screener)
    a, b = read_out(out), read_out(ref)
    assert a == b and a["pos"] == list(range(26)) and len(set(a["item_id"])) == 26
    assert not list(out.glob(".*.tmp")) and not list((out / "_done").glob(".*.tmp"))
