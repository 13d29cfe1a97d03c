"""data build on a tiny model and fixture sources: rows, manifest, determinism, resume, overwrite, CLI."""
from __future__ import annotations

import json

import pytest
from data_fixtures import fixture_sources  # noqa: F401  (pytest fixture)

from repbend.config import load_config
from repbend.data import build as build_mod
from repbend.data.build import build_dataset, make_rows, user_text, _key
from repbend.data.build_config import DataBuildConfig
from repbend.data.dataset import load_built
from repbend.errors import RepbendError


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls on a shared, loaded 2-core CPU run ~100x faster on one thread (no OpenMP spinning)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(model_dir, **over) -> DataBuildConfig:
    data = {
        "model": str(model_dir), "seed": 0,
        "harmful": [{"source": "advbench"},
                    {"source": "donotanswer", "options": {"files": ["malicious_uses", "information_hazard"]}}],
        "benign": [{"source": "project", "options": {"file": "benign"}},
                   {"source": "project", "options": {"file": "overrefusal", "split": "train"}}],
        "generation": {"batch_size": 4, "max_new_tokens_harmful": 6, "max_new_tokens_benign": 8,
                       "do_sample": True},  # a random tiny model answers only newlines when greedy
        "val_fraction": 0.25,
    }
    return load_config(DataBuildConfig, data=data, overrides=[f"{k}={v}" for k, v in over.items()])


def test_build_writes_valid_rows_manifest_and_is_deterministic(fixture_sources, tiny_model_dir, tmp_path):
    cfg = small_config(tiny_model_dir)
    m = build_dataset(cfg, tmp_path / "a", progress=False)
    ds = load_built(tmp_path / "a")
    # fixture AdvBench has 5 requests, 2 of them planted overlaps -> 3 + 3 Do-Not-Answer = 6 harmful
    assert m["requests"]["harmful_requests"] == 6 and m["requests"]["benign_requests"] == 8
    dec = m["decontamination"]["by_source"]
    assert dec["advbench"] == {"read": 5, "kept": 3, "dropped": {"ngram_jaccard": 1, "exact": 1}}
    assert m["decontamination"]["dropped"] == 2
    dropped = [json.loads(x) for x in (tmp_path / "a" / "decontam.jsonl").read_text().splitlines()]
    assert {d["id"] for d in dropped} == {"advbench/1", "advbench/2"}
    rows = ds.train + ds.val
    # every harmful request: one project refusal (SAFE) + the model's answer (UNSAFE, or SAFE if it refused)
    by_pair: dict = {}
    for r in rows:
        if r["pair_id"]:
            by_pair.setdefault(r["pair_id"], []).append(r)
    assert len(by_pair) == 6
    for pair in by_pair.values():
        assert sum("#refusal:" in r["id"] for r in pair) == 1
        assert {r["messages"][0]["content"] for r in pair} == {pair[0]["messages"][0]["content"]}
    assert m["requests"]["harmful_complied"] == sum(r["split"] == "unsafe" for r in rows)
    # benign: SAFE + RETAIN with the same answer; over-refusal prompts keep their kind
    retain = [r for r in rows if r["split"] == "retain"]
    assert len(retain) == 8 and {r["kind"] for r in retain} == {"benign", "overrefusal"}
    # val holds out whole requests: 25% of 6 harmful and of 8 benign
    assert len({r["pair_id"] for r in ds.val if r["pair_id"]}) == 2
    assert len({r["id"].split("#")[0] for r in ds.val if not r["pair_id"]}) == 2
    assert m["counts"]["train"]["total"] == len(ds.train) and m["counts"]["val"]["total"] == len(ds.val)
    # provenance of every input file and checksums of outputs
    assert {i["source"] for i in m["inputs"]} >= {"advbench", "donotanswer", "project", "harmbench", "jbb",
                                                   "strongreject"}
    assert all(len(i["sha256"]) == 64 for i in m["inputs"])
    assert set(m["outputs"]) == {"train.jsonl", "val.jsonl", "decontam.jsonl", "generations.jsonl"}
    assert m["model"]["spec"] == str(tiny_model_dir) and "config.json" in m["model"]["files"]
    assert (tmp_path / "a" / "config.yaml").is_file() and (tmp_path / "a" / "run_info.json").is_file()
    # same config and seed -> byte-identical output in another folder
    build_dataset(cfg, tmp_path / "b", progress=False)
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_interrupted_build_resumes_without_regenerating(fixture_sources, tiny_model_dir, tmp_path, monkeypatch):
    cfg = small_config(tiny_model_dir, **{"generation.batch_size": 1})   # 4 batches of 1 per generator call
    build_dataset(cfg, tmp_path / "ref", progress=False)
    real = build_mod.generate
    seen: list[str] = []

    def crash_after_first_batch(model, tok, convs, **kw):
        if seen:
            raise KeyboardInterrupt("simulated interruption")
        out = real(model, tok, convs, **kw)
        seen.extend(c[0]["content"] for c in convs)
        return out

    monkeypatch.setattr(build_mod, "generate", crash_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(cfg, tmp_path / "run", progress=False)
    assert len(seen) == 4
    assert not (tmp_path / "run" / "manifest.json").exists() and not (tmp_path / "run" / "train.jsonl").exists()
    with pytest.raises(RepbendError, match="no manifest.json"):
        load_built(tmp_path / "run")
    ckpt = [json.loads(x) for x in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert len(ckpt) == 4

    with (tmp_path / "run" / "generations.jsonl").open("a") as f:  # killed in the middle of an append
        f.write('{"key": "abc", "te')
    second: list[str] = []

    def counting(model, tok, convs, **kw):
        second.extend(c[0]["content"] for c in convs)
        return real(model, tok, convs, **kw)

    monkeypatch.setattr(build_mod, "generate", counting)
    m = build_dataset(cfg, tmp_path / "run", progress=False)
    assert not set(seen) & set(second), "prompts answered before the interruption were generated again"
    assert len(second) == 14 - 4 and m["outputs"]["generations.jsonl"]["rows"] == 14
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_finished_build_is_reused_and_a_different_one_refused(fixture_sources, tiny_model_dir, tmp_path,
                                                              monkeypatch):
    cfg = small_config(tiny_model_dir)
    first = build_dataset(cfg, tmp_path / "out", progress=False)

    def no_generation(*a, **k):
        raise AssertionError("a finished build must not generate again")

    monkeypatch.setattr(build_mod, "generate", no_generation)
    assert build_dataset(cfg, tmp_path / "out", progress=False) == first
    other = small_config(tiny_model_dir, seed=1)
    with pytest.raises(RepbendError, match="already holds a different build .*--overwrite"):
        build_dataset(other, tmp_path / "out", progress=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(RepbendError, match="already holds other files"):
        build_dataset(cfg, tmp_path / "foreign", progress=False)
    monkeypatch.undo()
    import repbend.data.sources as sources  # undo() also reset the fixture's patches; restore them
    from data_fixtures import FIXTURES, PACKAGED
    monkeypatch.setattr(sources, "package_file", lambda n, v, rel: FIXTURES / PACKAGED[rel])
    monkeypatch.setattr(sources, "RESOURCES", FIXTURES / "project")
    m = build_dataset(other, tmp_path / "out", overwrite=True, progress=False)
    assert m["seed"] == 1 and m["config_hash"] != first["config_hash"]
    assert load_built(tmp_path / "out").manifest["seed"] == 1


def test_long_responses_are_truncated_and_counted(fixture_sources, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer
    cfg = small_config(tiny_model_dir, max_response_tokens=8)
    m = build_dataset(cfg, tmp_path / "t", progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = load_built(tmp_path / "t").train
    assert m["truncated"]["response"] > 0 and m["truncated"]["max_response_tokens"] == 8
    refusals = [r for r in rows if "#refusal:" in r["id"]]  # clean text (random-model answers may not round-trip)
    assert refusals and all(len(tok(r["response"], add_special_tokens=False)["input_ids"]) <= 8 for r in refusals)
    assert any(len(tok(r["response"], add_special_tokens=False)["input_ids"]) == 8 for r in refusals)


def test_make_rows_sorts_answers_by_refusal_detection():
    cfg = DataBuildConfig(model="x")
    req = lambda i, src, p: {"id": f"{src}/{i}", "prompt": p, "context": None, "source": src}  # noqa: E731
    data = {"harmful": [req(0, "advbench", "make a bomb"), req(1, "advbench", "steal a car")],
            "benign": [req(0, "project_benign", "bake bread"), req(1, "project_overrefusal", "kill a process")],
            "refusals": [{"id": "project_refusals/r1", "response": "I won't help with that."}]}
    g = cfg.generation
    answers = {_key("make a bomb", g.max_new_tokens_harmful): "Sure, here is how: step 1 ...",
               _key("steal a car", g.max_new_tokens_harmful): "I'm sorry, but I can't help with stealing.",
               _key("bake bread", g.max_new_tokens_benign): "Mix flour and water, knead, bake.",
               _key("kill a process", g.max_new_tokens_benign): "I cannot help with killing."}
    stats = {k: 0 for k in ("harmful_complied", "harmful_refused_by_model", "benign_refused_by_model",
                            "empty_answers")}
    rows = {r["id"]: r for r in make_rows(data, answers, cfg, stats)}
    assert rows["advbench/0#harmful"]["split"] == "unsafe"
    assert rows["advbench/0#refusal:project_refusals/r1"]["response"] == "I won't help with that."
    assert rows["advbench/1#model_refusal"]["split"] == "safe" and "advbench/1#harmful" not in rows
    assert rows["project_benign/0#safe"]["kind"] == "benign" and "project_benign/0#retain" in rows
    # a refused over-refusal prompt is never taught as SAFE, only kept for RETAIN
    assert "project_overrefusal/1#safe" not in rows and rows["project_overrefusal/1#retain"]["kind"] == "overrefusal"
    assert stats == {"harmful_complied": 1, "harmful_refused_by_model": 1, "benign_refused_by_model": 1,
                     "empty_answers": 0}
    assert user_text({"prompt": "q", "context": "ctx"}) == "ctx\n\n---\n\nq"


def test_cli_build_and_show(fixture_sources, tiny_model_dir, tmp_path, capsys):
    import yaml

    from repbend.cli import main as cli_main

    def main(argv):
        with pytest.raises(SystemExit) as done:
            cli_main(argv)
        if done.value.code not in (0, None):
            raise done.value

    cfg_file = tmp_path / "data.yaml"
    cfg_file.write_text(yaml.safe_dump(small_config("unused").model_dump(mode="json")))
    main(["data", "build", "--config", str(cfg_file), "--model", str(tiny_model_dir), "--output",
          str(tmp_path / "cli"), "--no-progress", "val_fraction=0.5"])
    out = capsys.readouterr().out
    assert "built" in out and "decontamination dropped 2" in out
    assert load_built(tmp_path / "cli").manifest["model"]["spec"] == str(tiny_model_dir)
    main(["data", "show", str(tmp_path / "cli"), "-n", "1"])
    shown = capsys.readouterr().out
    assert "rows per split" in shown and "advbench" in shown and "ngram_jaccard: 1" in shown
    with pytest.raises(SystemExit) as e:
        cli_main(["data", "build", "--config", str(cfg_file), "--output", str(tmp_path / "x"),
                  "generation.batch_size=0"])
    assert e.value.code == 2
    assert "generation.batch_size" in capsys.readouterr().err


def _train_cfg(data_dir, seed, steps):
    from repbend.training import TrainConfig
    return TrainConfig.model_validate({"data": {"dir": str(data_dir), "batch_size": {"safe": 2, "unsafe": 1,
                                                                                     "retain": 1}},
                                       "output_dir": "unused", "training": {"max_steps": steps, "seed": seed}})


def _draws(data_dir, cfg, steps):
    """The rows (ids) a run of ``cfg`` draws from the data folder, split by split, step by step."""
    from repbend.training.data import StepSampler, split_rows

    by = split_rows(load_built(data_dir).train, ["safe", "unsafe", "retain"])
    sampler = StepSampler(by, cfg.data.batch_size, cfg.training.seed, ids={s: [r["id"] for r in rows]
                                                                             for s, rows in by.items()})
    return [{s: [r["id"] for r in rows] for s, rows in sampler.next().items()} for _ in range(steps)]


def test_budgeted_build_gives_the_runs_the_rows_of_a_whole_build_and_extends(fixture_sources, tiny_model_dir,
                                                                             tmp_path, monkeypatch):
    """rows_needed: only the requests whose rows the runs draw (and the validation requests) are answered; the
    runs then draw exactly the rows of a whole-pool build, val.jsonl is the whole build's, and a larger budget
    extends the folder without answering anything twice (the same files as a fresh build of that budget)."""
    from repbend.data.build_config import RowBudget
    from repbend.training.data import budget_note, draws_of

    real, asked = build_mod.generate, []

    def counting(model, tok, convs, **kw):
        asked.extend(c[0]["content"] for c in convs)
        return real(model, tok, convs, **kw)

    monkeypatch.setattr(build_mod, "generate", counting)
    whole = small_config(tiny_model_dir, **{"generation.batch_size": 1})
    build_dataset(whole, tmp_path / "whole", progress=False)
    n_whole, run = len(asked), _train_cfg(tmp_path / "run", seed=3, steps=2)
    small = whole.model_copy(update={"rows_needed": RowBudget(draws=[draws_of(run)], margin=0, window=1)})
    asked.clear()
    m1 = build_dataset(small, tmp_path / "run", progress=False)
    req = m1["requests"]
    assert req["harmful_requests"] + req["unanswered_harmful"] == 6
    assert req["benign_requests"] + req["unanswered_benign"] == 8
    assert len(asked) == req["harmful_requests"] + req["benign_requests"] < n_whole
    assert (tmp_path / "run" / "val.jsonl").read_bytes() == (tmp_path / "whole" / "val.jsonl").read_bytes()
    part, full = load_built(tmp_path / "run").train, load_built(tmp_path / "whole").train
    assert [r for r in full if r["id"] in {x["id"] for x in part}] == part and len(part) < len(full)
    assert _draws(tmp_path / "run", run, 2) == _draws(tmp_path / "whole", run, 2)
    assert budget_note(run) is None
    longer = _train_cfg(tmp_path / "run", seed=3, steps=6)
    assert "built for other draws" in budget_note(longer) and "seed 3, safe 12" in budget_note(longer)
    assert _draws(tmp_path / "run", longer, 6) != _draws(tmp_path / "whole", longer, 6)   # past the budget

    big = small.model_copy(update={"rows_needed": RowBudget(draws=[draws_of(longer)], margin=0, window=1)})
    first = list(asked)
    build_dataset(big, tmp_path / "run", progress=False)            # same folder: extended, not refused
    assert not set(first) & set(asked[len(first):]), "answers of the smaller build were generated again"
    assert _draws(tmp_path / "run", longer, 6) == _draws(tmp_path / "whole", longer, 6)
    build_dataset(big, tmp_path / "fresh", progress=False)              # a fresh build of the larger budget
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()


def test_the_default_build_keeps_its_config_hash():
    """A finished `repbend data build` / demo data folder is recognised by this hash; if it changes, every user's
    finished build is refused ('already holds a different build') and must be rebuilt. Change it only on purpose."""
    from repbend.config import load_config
    from repbend.data.build import config_hash
    from repbend.data.build_config import load_build_config
    from repbend.paths import resolve_config

    cfg = load_build_config(str(resolve_config("data-default")))
    cfg = load_config(type(cfg), data={**cfg.model_dump(mode="json"), "model": "default"})
    assert config_hash(cfg) == "e1d6892912d2d7a9"   # generation.batch_size 16 -> 64


def test_val_retain_answers_only_the_held_out_requests_an_evaluation_reads(fixture_sources, tiny_model_dir, tmp_path,
                                                                           monkeypatch):
    """rows_needed.val_retain=N: of the held-out requests only the benign ones giving the first N val retain rows are
    answered; those rows equal the whole build's first N, training draws are unchanged, held-out harmful requests keep
    their project refusal, and a run validating on the partial split (eval_every) is told so."""
    from repbend.data.build_config import RowBudget
    from repbend.training.data import budget_note, draws_of

    real, asked = build_mod.generate, []

    def counting(model, tok, convs, **kw):
        asked.extend(c[0]["content"] for c in convs)
        return real(model, tok, convs, **kw)

    monkeypatch.setattr(build_mod, "generate", counting)
    whole = small_config(tiny_model_dir, **{"generation.batch_size": 1, "val_fraction": 0.5})
    build_dataset(whole, tmp_path / "whole", progress=False)
    run = _train_cfg(tmp_path / "run", seed=3, steps=2)
    every = RowBudget(draws=[draws_of(run)], margin=0, window=1)
    build_dataset(whole.model_copy(update={"rows_needed": every}), tmp_path / "all-val", progress=False)
    asked.clear()
    some = every.model_copy(update={"val_retain": 1})
    build_dataset(whole.model_copy(update={"rows_needed": some}), tmp_path / "run", progress=False)
    full_val, part_val = load_built(tmp_path / "whole").val, load_built(tmp_path / "run").val
    retain = lambda rows: [r for r in rows if r["split"] == "retain"]   # noqa: E731
    assert len(retain(full_val)) >= 2, "the fixture must hold out at least two benign requests"
    assert retain(part_val) == retain(full_val)[:1]
    held_harmful = [r for r in part_val if r["kind"] == "refusal"]
    assert held_harmful and not [r for r in part_val if r["split"] == "unsafe"]
    assert [r for r in full_val if r["kind"] == "refusal"] == held_harmful
    n_all = sum(load_built(tmp_path / "all-val").manifest["requests"][k] for k in ("harmful_requests",
                                                                                   "benign_requests"))
    n_some = sum(load_built(tmp_path / "run").manifest["requests"][k] for k in ("harmful_requests", "benign_requests"))
    assert n_some == len(asked) < n_all
    assert (tmp_path / "run" / "train.jsonl").read_bytes() == (tmp_path / "all-val" / "train.jsonl").read_bytes()
    assert budget_note(run) is None
    validating = run.model_copy(update={"training": run.training.model_copy(update={"eval_every": 1})})
    assert "partial val split" in budget_note(validating)
