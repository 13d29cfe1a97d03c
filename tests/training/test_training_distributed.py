"""Two CPU processes (torchrun, gloo) train the tiny model; both ranks must end identical."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from train_fixtures import built_dir, tiny_train_config  # noqa: F401 (fixture)


@pytest.mark.slow  # ~80 s on 2 shared cores (two processes start, load and train)
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_processes_agree(tiny_model_dir, built_dir, tmp_path):
    cfg = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run", max_steps=3, layer_stats_every=2)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    worker = Path(__file__).with_name("ddp_train_worker.py")
    # the workers import the repbend this test runs on (an outer PYTHONPATH, e.g. a source checkout, is kept)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(worker.parent), os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run([shutil.which("torchrun"), "--nproc_per_node", "2", "--master_port", "29533", str(worker),
                          str(path), str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["world"] == r1["world"] == 2
    assert r0["weights"].keys() == r1["weights"].keys() and r0["weights"]
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    assert len(r0["logged"]) == 3 and r0["logged"] == r1["logged"]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4  # header + 3 steps, written once (by rank 0)
    # 2 processes x 2 rows per split: twice the tokens of one process per step
    assert all(int(r.split(",")[rows[0].split(",").index("tokens")]) > 0 for r in rows[1:])
