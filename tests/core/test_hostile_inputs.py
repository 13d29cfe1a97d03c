"""What a careless or hostile user meets at the command line: one ``error:`` line and exit 2, never a traceback,
and no run folder written over by another kind of run, an empty path or a concurrent run."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from cli_helpers import LockHolder, cli, one_line_error, write_train_yaml

LIGHT = ["attacks=[{name: direct}]", "over_refusal.enabled=false"]


@pytest.fixture(scope="module")
def fixtures(load_script):
    return load_script("tests/training/train_fixtures.py")


@pytest.fixture(scope="module")
def data_dir(fixtures, tmp_path_factory):
    return fixtures.write_built(tmp_path_factory.mktemp("built") / "built", fixtures.make_rows())


@pytest.fixture(scope="module")
def trained(fixtures, tiny_model_dir, data_dir, tmp_path_factory):
    """A finished one-step LoRA training run (the folder other commands must not write over)."""
    from repbend.training import train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(fixtures.tiny_train_config(tiny_model_dir, data_dir, run, max_steps=1, layer_stats_every=0))
    return run


@pytest.fixture()
def run_copy(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


@pytest.fixture()
def suite_file(tmp_path):
    behaviours = tmp_path / "behaviours.jsonl"
    behaviours.write_text("".join(json.dumps({"id": f"x{i}", "prompt": f"Explain harmful thing {i}",
                                              "category": "c", "target": "Sure"}) + "\n" for i in range(2)))
    p = tmp_path / "suite.yaml"
    p.write_text(yaml.safe_dump({"name": "tiny", "benchmarks": [{"name": "file", "path": str(behaviours), "n": 2}],
                                 "attacks": [{"name": "direct"}], "judge": {"name": "refusal"},
                                 "generation": {"max_new_tokens": 2, "batch_size": 2},
                                 "over_refusal": {"enabled": False}}))
    return p


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".repbend.lock"}


# ---------------------------------------------------------------- one folder, one kind of run

def test_eval_and_data_build_refuse_a_training_run_folder(run_copy, suite_file, tiny_model_dir, capsys):
    before = _snapshot(run_copy)
    code, _, err = cli(capsys, "eval", "-m", tiny_model_dir, "-s", suite_file, "-o", run_copy)
    one_line_error(code, err, str(run_copy), "training run", "--overwrite")
    code, _, err = cli(capsys, "data", "build", "-m", tiny_model_dir, "-o", run_copy)
    one_line_error(code, err, str(run_copy), "training run", "--overwrite")
    assert _snapshot(run_copy) == before


def test_train_refuses_evaluation_results_and_foreign_files(fixtures, tiny_model_dir, data_dir, tmp_path, capsys):
    evald = tmp_path / "eval"
    evald.mkdir()
    (evald / "results.json").write_text("{}")
    (evald / "eval_target.json").write_text(json.dumps({"model": "m", "adapter": None}))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    for out, what in ((evald, "evaluation results"), (foreign, "thesis.tex")):
        cfg = fixtures.tiny_train_config(tiny_model_dir, data_dir, out, max_steps=1)
        code, _, err = cli(capsys, "train", "-c", write_train_yaml(cfg, tmp_path / "t.yaml"))
        one_line_error(code, err, str(out), what, "--overwrite")
    assert sorted(p.name for p in foreign.iterdir() if p.name != ".repbend.lock") == ["thesis.tex"]
    code, _, err = cli(capsys, "data", "build", "-m", tiny_model_dir, "-o", evald)
    one_line_error(code, err, str(evald), "evaluation results")


def test_eval_overwrite_replaces_a_training_run_but_keeps_foreign_files(run_copy, suite_file, tiny_model_dir,
                                                                         capsys):
    (run_copy / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, "eval", "-m", tiny_model_dir, "-s", suite_file, "-o", run_copy, "--overwrite",
                       "--no-report")
    assert code == 0, err
    assert (run_copy / "results.json").is_file() and (run_copy / "notes.txt").read_text() == "mine"
    assert not (run_copy / "metrics.csv").exists() and not (run_copy / "adapter_model.safetensors").exists()
    assert json.loads((run_copy / "run_info.json").read_text())["kind"] == "eval"
    assert "suite" in yaml.safe_load((run_copy / "config.yaml").read_text())


def test_a_second_writer_on_eval_and_data_folders_gets_one_line(suite_file, tiny_model_dir, tmp_path, capsys):
    a, b = tmp_path / "eval", tmp_path / "data"
    with LockHolder(a, b):
        code, _, err = cli(capsys, "eval", "-m", tiny_model_dir, "-s", suite_file, "-o", a)
        one_line_error(code, err, str(a), "in use")
        code, _, err = cli(capsys, "data", "build", "-m", tiny_model_dir, "-o", b)
        one_line_error(code, err, str(b), "in use")
    assert [p.name for p in a.iterdir()] == [".repbend.lock"] and [p.name for p in b.iterdir()] == [".repbend.lock"]


# ---------------------------------------------------------------- empty paths and ~

def test_empty_output_paths_are_refused(fixtures, tiny_model_dir, data_dir, suite_file, tmp_path, monkeypatch,
                                        capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "keep.txt").write_text("x")
    monkeypatch.chdir(cwd)
    cfg = fixtures.tiny_train_config(tiny_model_dir, data_dir, tmp_path / "unused", max_steps=1)
    yaml_path = write_train_yaml(cfg, tmp_path / "t.yaml", output_dir="")
    code, _, err = cli(capsys, "train", "-c", yaml_path)
    one_line_error(code, err, "output_dir", "empty")
    code, _, err = cli(capsys, "train", "-c", write_train_yaml(cfg, tmp_path / "t2.yaml"), "output_dir=''")
    one_line_error(code, err, "output_dir", "empty")
    code, _, err = cli(capsys, "eval", "-m", tiny_model_dir, "-s", suite_file, "-o", "")
    one_line_error(code, err, "--output-dir", "empty")
    code, _, err = cli(capsys, "data", "build", "-m", tiny_model_dir, "-o", " ")
    one_line_error(code, err, "--output", "empty")
    code, _, err = cli(capsys, "merge", "-a", tmp_path, "-o", "")
    one_line_error(code, err, "--output", "empty")
    assert sorted(p.name for p in cwd.iterdir()) == ["keep.txt"]


def test_tilde_is_expanded_in_user_paths(fixtures, trained, tiny_model_dir, data_dir, suite_file, tmp_path,
                                         monkeypatch, capsys):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    shutil.copytree(trained, home / "run")
    shutil.copytree(data_dir, home / "built")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    code, _, err = cli(capsys, "eval", "-m", tiny_model_dir, "-s", suite_file, "-o", "~/run")
    one_line_error(code, err, str(home / "run"), "training run")          # it looked in ~/run, not ./~/run
    code, _, err = cli(capsys, "data", "build", "-m", tiny_model_dir, "-o", "~/run")
    one_line_error(code, err, str(home / "run"))
    cfg = fixtures.tiny_train_config(tiny_model_dir, data_dir, tmp_path / "unused", max_steps=1, layer_stats_every=0)
    code, _, err = cli(capsys, "train", "-c", write_train_yaml(cfg, tmp_path / "t.yaml"), "output_dir=~/new",
                       "data.dir=~/built")
    assert code == 0, err
    assert (home / "new" / "adapter_model.safetensors").is_file()
    code, _, err = cli(capsys, "merge", "-a", "~/new", "-o", "~/merged")
    assert code == 0, err
    assert (home / "merged" / "model.safetensors").is_file()
    code, out, err = cli(capsys, "data", "show", "~/built", "-n", "0")   # found (then: a manifest without counts)
    one_line_error(code, err, str(home / "built" / "manifest.json"))
    shutil.copy(suite_file, home / "suite.yaml")
    code, out, err = cli(capsys, "eval", "-s", "~/suite.yaml", "-o", "~/e", "--validate-only")
    assert code == 0 and "suite tiny: OK" in out, err
    assert "~" not in [p.name for p in cwd.iterdir()] and list(cwd.iterdir()) == []


# ---------------------------------------------------------------- damaged files: one line naming the file

@pytest.fixture()
def truncated_model(tiny_model_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    _truncate(d / "model.safetensors")
    return d


@pytest.fixture()
def truncated_adapter(run_copy):
    _truncate(run_copy / "adapter_model.safetensors")
    return run_copy


def test_truncated_model_weights_are_one_line(truncated_model, trained, suite_file, tmp_path, capsys):
    for args in (["chat", "hi", "-m", truncated_model],
                 ["eval", "-m", truncated_model, "-s", suite_file, "-o", tmp_path / "e"],
                 ["merge", "-a", trained, "--base", truncated_model, "-o", tmp_path / "m"]):
        code, _, err = cli(capsys, *args)
        one_line_error(code, err, str(truncated_model))
    from repbend.io import folder_contents

    assert folder_contents(tmp_path / "m") == []      # nothing half-merged left behind


def test_truncated_adapter_weights_are_one_line(truncated_adapter, tiny_model_dir, suite_file, tmp_path, capsys):
    for args in (["chat", "hi", "-m", tiny_model_dir, "-a", truncated_adapter],
                 ["chat", "hi", "-m", truncated_adapter],
                 ["eval", "-m", tiny_model_dir, "-a", truncated_adapter, "-s", suite_file, "-o", tmp_path / "e"],
                 ["merge", "-a", truncated_adapter, "-o", tmp_path / "m"]):
        code, _, err = cli(capsys, *args)
        one_line_error(code, err, "adapter_model.safetensors")


def test_corrupt_eval_target_is_one_line(suite_file, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "e"
    out.mkdir()
    for bad in ("{not json", "[1, 2]", "\udcff"):
        (out / "eval_target.json").write_bytes(bad.encode("utf-8", "surrogateescape"))
        code, _, err = cli(capsys, "eval", "-m", tiny_model_dir, "-s", suite_file, "-o", out)
        one_line_error(code, err, str(out / "eval_target.json"), "--overwrite")
    code, _, err = cli(capsys, "eval", "-m", tiny_model_dir, "-s", suite_file, "-o", out, "--overwrite",
                       "--no-report")
    assert code == 0, err
    assert json.loads((out / "eval_target.json").read_text())["model"] == str(tiny_model_dir)


def test_data_show_on_a_manifest_without_counts_is_one_line(data_dir, capsys):
    code, _, err = cli(capsys, "data", "show", data_dir)
    one_line_error(code, err, "manifest.json", "repbend data build")


def test_a_planted_lock_symlink_is_not_followed(tmp_path, capsys):
    from repbend.errors import RepbendError
    from repbend.io import output_lock

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".repbend.lock").symlink_to(victim)
    with pytest.raises(RepbendError, match="Cannot create or lock the output folder"):
        with output_lock(out):
            pass
    assert victim.read_text() == "keep me"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RepbendError, match="is a file"):
        with output_lock(blocker):
            pass
    with pytest.raises(RepbendError, match="Cannot create or lock"):
        with output_lock(blocker / "below"):
            pass


def test_a_cached_answer_without_its_text_is_generated_again(tiny_model, tiny_tokenizer, tmp_path):
    """A cache line edited down to its key (valid JSON, no text) must not crash the evaluation: it is regenerated."""
    from repbend.evaluation.store import Store
    from repbend.evaluation.target import ModelTarget
    from repbend.evaluation.types import Conversation, GenSettings

    def target():
        return ModelTarget(tiny_model, tiny_tokenizer, Store(tmp_path / "cache.jsonl"), batch_size=2,
                           fingerprint="fp", settings=GenSettings(max_new_tokens=3), progress=False)

    convs = [Conversation(f"b{i}", "direct", "", [{"role": "user", "content": f"Say {i}"}]) for i in range(2)]
    first = target().generate(convs)
    lines = (tmp_path / "cache.jsonl").read_text().splitlines()
    damaged = {"key": json.loads(lines[0])["key"], "kind": "completion"}
    (tmp_path / "cache.jsonl").write_text("\n".join([json.dumps(damaged), *lines[1:]]) + "\n")
    t = target()
    assert t.generate(convs) == first and t.stats["generated"] == 1 and t.stats["cached"] == 1


def test_run_kind_is_recorded_and_recognised_in_older_folders(trained, tmp_path):
    from repbend.io import claim_output, run_kind

    assert json.loads((trained / "run_info.json").read_text())["kind"] == "train" and run_kind(trained) == "train"
    for info, kind in (({"status": "running"}, "train"), ({"fingerprint": "ab"}, "eval"),
                       ({"config_hash": "cd"}, "data"), ({"merged_from": {}}, "merge"), ([1], None)):
        d = tmp_path / str(kind)
        d.mkdir(exist_ok=True)
        (d / "run_info.json").write_text(json.dumps(info))
        assert run_kind(d) == kind
    assert claim_output(tmp_path / "missing", "eval") is None
    (tmp_path / "only-lock").mkdir()
    (tmp_path / "only-lock" / ".repbend.lock").write_text("")
    assert claim_output(tmp_path / "only-lock", "train") is None


def test_a_damaged_manifest_of_a_finished_build_is_one_line(tiny_model_dir, tmp_path, capsys):
    from repbend.data.build import STATE, config_hash
    from repbend.data.build_config import load_build_config

    out = tmp_path / "data"
    out.mkdir()
    chash = config_hash(load_build_config(None, [f"model={tiny_model_dir}"]))
    (out / STATE).write_text(json.dumps({"config_hash": chash}))
    for bad in ("{oops", json.dumps({"counts": 3})):
        (out / "manifest.json").write_text(bad)
        code, _, err = cli(capsys, "data", "build", "-m", tiny_model_dir, "-o", out)
        one_line_error(code, err, str(out / "manifest.json"), "--overwrite")
