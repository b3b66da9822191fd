"""--engine ray: same rows as the local engine on the same input (skips without ray)."""
from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from vars_fast.data.synthetic import write_image_folder  # noqa: E402
from vars_fast.screen import screen  # noqa: E402
from screen_fixtures import make_checkpoint  # noqa: E402

os.environ.setdefault("VARS_FAST_PROGRESS", "0")


def _read(out):
    return pq.read_table(sorted(out.glob("part-*.parquet"))).to_pydict()


@pytest.mark.slow  # starts a local Ray cluster: `make test-all` runs it, `make test` does not
@pytest.mark.timeout(600)
def test_ray_matches_local(tmp_path):
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path / "imgs"
    write_image_folder(root, 14, size=40, fmt="mixed")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    ck = make_checkpoint(tmp_path / "defense.pt", image_size=32, width=8, n_res_blocks=1, calibrate=8)
    kw = dict(batch_size=4, shard_size=6, workers=0)
    local = screen(str(root), str(ck), str(tmp_path / "local"), **kw)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # a run started locally and finished by Ray: shard 0 is reused, the rest come from Ray
        part = screen(str(root), str(ck), str(tmp_path / "mixed"), limit=6, **kw)
        assert part["rows"] == 6
        res = screen(str(root), str(ck), str(tmp_path / "ray"), engine="ray", ray_actors=1, **kw)
        mixed = screen(str(root), str(ck), str(tmp_path / "mixed"), engine="ray", **kw)
    finally:
        ray.shutdown()
        torch.set_num_threads(n_threads)
    a, b, c = _read(tmp_path / "local"), _read(tmp_path / "ray"), _read(tmp_path / "mixed")
    assert res["counts"] == local["counts"] == {"ok": 14, "unreadable": 1}
    flagged = lambda t: {i for i, f in zip(t["item_id"], t["flagged"]) if f}  # noqa: E731
    assert flagged(a) == flagged(b) == flagged(c) and 0 < len(flagged(a)) < 14
    for t in (b, c):
        assert t["item_id"] == a["item_id"] and t["status"] == a["status"]
        torch.testing.assert_close(torch.tensor([d or 0.0 for d in t["distance"]]),
                                   torch.tensor([d or 0.0 for d in a["distance"]]), rtol=1e-5, atol=1e-6)
    assert mixed["config"]["resumed_shards"] == 1 and mixed["config"]["engine"] == "ray"
