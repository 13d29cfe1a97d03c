"""Run folders under a careless or hostile user: locks, safe and verified checkpoints, fallback, restart.

Everything goes through ``repbend train`` as a user runs it; the tiny random Llama keeps each run to seconds.
"""
from __future__ import annotations

import csv
import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

import repbend.training.trainer as trainer_mod
from cli_helpers import LockHolder, cli, one_line_error, try_lock_elsewhere, write_train_yaml
from repbend.training import train
from train_fixtures import make_rows, tiny_train_config, write_built


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_built(tmp_path_factory.mktemp("built"), make_rows())


def _cfg(model_dir, data_dir, out, **training):
    training.setdefault("layer_stats_every", 0)
    cfg = tiny_train_config(model_dir, data_dir, out, **training)
    cfg.lora.dropout = 0.1   # the torch RNG shapes the weights: a lost RNG state shows in them
    return cfg


@pytest.fixture(scope="module")
def finished(tiny_model_dir, data_dir, tmp_path_factory):
    """A finished 3-step run with checkpoints at steps 1 and 2, and its final adapter weights."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(_cfg(tiny_model_dir, data_dir, run, max_steps=3, save_every=1, keep_checkpoints=3))
    return run, load_file(run / "adapter_model.safetensors")


def _copy(finished, tmp_path, tiny_model_dir, data_dir, **training):
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    cfg = _cfg(tiny_model_dir, data_dir, run, max_steps=3, save_every=1, keep_checkpoints=3, **training)
    return run, write_train_yaml(cfg, tmp_path / "train.yaml")


def _same_weights(run, expected):
    got = load_file(run / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7)


def _steps(run):
    with (run / "metrics.csv").open() as f:
        return [r["step"] for r in csv.DictReader(f)]


class _Planted:
    """Unpickling this creates a file: proof that loading ran code from the checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _refresh_manifest(ckpt):
    """What an attacker who edits a checkpoint would also do: make its manifest match the planted files."""
    from repbend.io import sha256_file

    path = ckpt / "manifest.json"
    if path.is_file():
        m = json.loads(path.read_text())
        for rel, entry in m["files"].items():
            f = ckpt / rel
            entry.update(sha256=sha256_file(f), size=f.stat().st_size)
        path.write_text(json.dumps(m))


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_malicious_checkpoint_pickle_does_not_run_and_resume_falls_back(planted, finished, tmp_path, tiny_model_dir,
                                                                       data_dir, capsys):
    run, yaml_path = _copy(finished, tmp_path, tiny_model_dir, data_dir)
    marker = tmp_path / "pwned"
    newest = run / "checkpoints" / "step-000002"
    evil = pickle.dumps(_Planted(marker))
    (newest / planted).write_bytes(evil)   # (custom_checkpoint_0.pkl: where accelerate unpickles with code)
    _refresh_manifest(newest)
    code, out, err = cli(capsys, "train", "-c", yaml_path, "--resume")
    assert not marker.exists(), "loading the checkpoint ran code planted in it"
    assert code == 0, err
    assert "step-000002" in err and "step-000001" in err   # warned, and said where it resumed from
    _same_weights(run, finished[1])                        # resumed from step 1: the uninterrupted run's weights
    assert _steps(run) == ["1", "2", "3"]


def test_checkpoint_state_loads_without_pickled_code(finished):
    """Nothing in a checkpoint needs a code-running unpickler: the loop state is JSON, the rest loads weights_only."""
    ckpt = finished[0] / "checkpoints" / "step-000002"
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["step"] == 2 and "sampler" in state and "scheduler" in state
    assert not (ckpt / "custom_checkpoint_0.pkl").exists()
    for f in ckpt.glob("*.bin"):
        torch.load(f, weights_only=True)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {"manifest.json", "DONE"}
    assert set(manifest["files"]) == files


def test_truncated_rng_state_falls_back_to_the_previous_checkpoint(finished, tmp_path, tiny_model_dir, data_dir,
                                                                   capsys):
    run, yaml_path = _copy(finished, tmp_path, tiny_model_dir, data_dir)
    rng = run / "checkpoints" / "step-000002" / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[: rng.stat().st_size // 2])
    code, out, err = cli(capsys, "train", "-c", yaml_path, "--resume")
    assert code == 0, err
    assert "random_states_0.pkl" in err and "step-000001" in err
    _same_weights(run, finished[1])


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.bin", "train_state.json", "adapter"])
def test_any_truncated_checkpoint_file_falls_back(victim, finished, tmp_path, tiny_model_dir, data_dir, capsys):
    run, yaml_path = _copy(finished, tmp_path, tiny_model_dir, data_dir)
    newest = run / "checkpoints" / "step-000002"
    f = newest / victim if victim != "adapter" else newest / "adapter" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:10])
    code, out, err = cli(capsys, "train", "-c", yaml_path, "--resume")
    assert code == 0, err
    assert "step-000002" in err and "step-000001" in err
    _same_weights(run, finished[1])


def test_no_good_checkpoint_is_one_line(finished, tmp_path, tiny_model_dir, data_dir, capsys):
    run, yaml_path = _copy(finished, tmp_path, tiny_model_dir, data_dir)
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "optimizer.bin").write_bytes(b"\x00" * 7)
    code, out, err = cli(capsys, "train", "-c", yaml_path, "--resume")
    one_line_error(code, err, str(run), "--overwrite")


class _Crash(Exception):
    pass


def test_run_cut_before_its_first_checkpoint_restarts(tiny_model_dir, data_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, data_dir, run, max_steps=3, save_every=2)
    yaml_path = write_train_yaml(cfg, tmp_path / "train.yaml")
    real = trainer_mod.Telemetry.log

    def crash(self, kind, step, values):
        real(self, kind, step, values)
        raise _Crash()

    monkeypatch.setattr(trainer_mod.Telemetry, "log", crash)
    with pytest.raises(_Crash):
        train(cfg)
    monkeypatch.undo()
    assert _steps(run) == ["1"] and not (run / "checkpoints").exists()
    code, out, err = cli(capsys, "train", "-c", yaml_path)          # a plain re-run says what to do
    one_line_error(code, err, str(run), "--resume", "--overwrite")
    code, out, err = cli(capsys, "train", "-c", yaml_path, "--resume")
    assert code == 0, err
    assert "no checkpoint" in err and "from scratch" in err
    assert _steps(run) == ["1", "2", "3"]
    first = load_file(run / "adapter_model.safetensors")
    code, out, err = cli(capsys, "train", "-c", yaml_path, "--resume", "--overwrite")
    one_line_error(code, err, "--resume", "--overwrite")
    (run / "notes.txt").write_text("mine")
    code, out, err = cli(capsys, "train", "-c", yaml_path, "--overwrite")
    assert code == 0, err
    assert _steps(run) == ["1", "2", "3"] and (run / "notes.txt").read_text() == "mine"
    _same_weights(run, first)


def test_finished_run_without_checkpoints_is_not_restarted_by_resume(tiny_model_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, data_dir, run, max_steps=1, save_every=0)
    train(cfg)
    before = (run / "adapter_model.safetensors").read_bytes()
    code, out, err = cli(capsys, "train", "-c", write_train_yaml(cfg, tmp_path / "t.yaml"), "--resume")
    one_line_error(code, err, str(run), "--overwrite")
    assert (run / "adapter_model.safetensors").read_bytes() == before


def test_a_second_writer_on_a_run_folder_gets_one_line(tiny_model_dir, data_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, data_dir, run, max_steps=1)
    yaml_path = write_train_yaml(cfg, tmp_path / "train.yaml")
    with LockHolder(run):
        code, out, err = cli(capsys, "train", "-c", yaml_path)
    one_line_error(code, err, str(run), "in use")
    assert not (run / "metrics.csv").exists() and not (run / "run_info.json").exists()
    # the run holds the lock while it trains: another process cannot take it then
    seen = []
    real = trainer_mod.write_run_info

    def spy(*a, **k):
        seen.append(try_lock_elsewhere(run))
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "write_run_info", spy)
    code, out, err = cli(capsys, "train", "-c", yaml_path)
    assert code == 0, err
    assert seen and not any(seen)
    assert try_lock_elsewhere(run)        # released at the end


def test_corrupt_run_config_and_metrics_are_one_line(finished, tmp_path, tiny_model_dir, data_dir, capsys):
    run, yaml_path = _copy(finished, tmp_path, tiny_model_dir, data_dir)
    good = (run / "config.yaml").read_bytes()
    for bad in (b"model: [unclosed\n", b"\xff\xfe\x00binary", b"- just\n- a list\n"):
        (run / "config.yaml").write_bytes(bad)
        code, out, err = cli(capsys, "train", "-c", yaml_path, "--resume")
        one_line_error(code, err, str(run / "config.yaml"))
    (run / "config.yaml").unlink()
    code, out, err = cli(capsys, "train", "-c", yaml_path, "--resume")
    one_line_error(code, err, "config.yaml", "--overwrite")
    (run / "config.yaml").write_bytes(good)
    for bad in (b"\xff\xfe\x00\x01binary\n", b"step,lr\nnot-a-step,1\n"):
        (run / "metrics.csv").write_bytes(bad)
        code, out, err = cli(capsys, "train", "-c", yaml_path, "--resume")
        one_line_error(code, err, str(run / "metrics.csv"))


@pytest.mark.slow  # two torchrun processes start twice (~1-2 min on 2 shared cores)
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_processes_fall_back_together(tiny_model_dir, data_dir, tmp_path):
    """Only rank 1's RNG file is bad (its manifest rewritten to match): both ranks must resume from the same,
    previous checkpoint and end with the uninterrupted run's weights."""
    import os
    import subprocess
    from pathlib import Path

    run = tmp_path / "run"
    yaml_path = write_train_yaml(_cfg(tiny_model_dir, data_dir, run, max_steps=3, save_every=1, keep_checkpoints=3),
                                 tmp_path / "train.yaml")
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src)}

    def torchrun(*extra, port):
        out = subprocess.run([shutil.which("torchrun"), "--nproc_per_node", "2", "--master_port", str(port), "-m",
                              "repbend.cli", "train", "-c", str(yaml_path), *extra], capture_output=True, text=True,
                             env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stderr

    torchrun(port=29561)
    expected = load_file(run / "adapter_model.safetensors")
    newest = run / "checkpoints" / "step-000002"
    marker = tmp_path / "pwned"
    (newest / "random_states_1.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    _refresh_manifest(newest)
    err = torchrun("--resume", port=29562)
    assert not marker.exists()
    assert "resuming from" in err and "step-000001" in err
    _same_weights(run, expected)


def test_checkpoints_of_an_older_repbend_resume_without_running_pickles(finished, tmp_path, tiny_model_dir, data_dir,
                                                                       capsys):
    """A checkpoint without a manifest, its loop state in custom_checkpoint_0.pkl (as repbend wrote them before):
    step 2's state file is planted code, step 1's is genuine. Resume refuses the first without running it and
    continues from step 1 to the uninterrupted run's weights."""
    run, yaml_path = _copy(finished, tmp_path, tiny_model_dir, data_dir)
    marker = tmp_path / "pwned"
    for ckpt in (run / "checkpoints").iterdir():
        state = json.loads((ckpt / "train_state.json").read_text())
        (ckpt / "train_state.json").unlink()
        (ckpt / "manifest.json").unlink()
        torch.save(state, ckpt / "custom_checkpoint_0.pkl")
    (run / "checkpoints" / "step-000002" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    code, out, err = cli(capsys, "train", "-c", yaml_path, "--resume")
    assert not marker.exists()
    assert code == 0, err
    assert "older repbend" in err and "resuming from" in err and "step-000001" in err
    _same_weights(run, finished[1])
