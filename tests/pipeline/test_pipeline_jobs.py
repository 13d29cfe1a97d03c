"""Pipeline: stage skipping/re-running, plan validation, mean ± std summary over seeds."""
from __future__ import annotations

import json

import pytest

from repbend.config import load_config
from repbend.errors import ConfigError, RepbendError
from repbend.evaluation.suites import load_suite
from repbend.pipeline.jobs import PipelineConfig, plan, with_heldout_benign, with_reference_model
from repbend.pipeline.stages import Stage, run_stages
from repbend.pipeline.summary import summarise


def test_finished_stage_is_skipped_and_changed_stage_reruns(tmp_path):
    calls = []
    st = Stage("s", tmp_path / "s", lambda: calls.append(1), {"x": 1})
    run_stages([st])
    run_stages([st])
    assert calls == [1]
    run_stages([Stage("s", tmp_path / "s", lambda: calls.append(2), {"x": 2})])
    assert calls == [1, 2]


def test_failed_stage_is_not_marked_done(tmp_path):
    def boom():
        raise RuntimeError("interrupted")

    st = Stage("s", tmp_path / "s", boom, {})
    with pytest.raises(RuntimeError):
        run_stages([st])
    assert not st.done()


def _results(asr_direct, asr_prefill, compliance, mmlu):
    return {"asr": {"direct": {"harmbench": {"n": 4, "asr": asr_direct, "gibberish": 0.0, "refusal": 0.5}},
                    "prefill": {"harmbench": {"n": 4, "asr": asr_prefill, "gibberish": 0.25, "refusal": 0.0}}},
            "average_asr": (asr_direct + asr_prefill) / 2, "over_refusal": {"n": 8, "compliance": compliance},
            "capability": {"mmlu": mmlu, "benign_kl": 0.026}, "judge": {"name": "default"}, "meta": {}}


def test_summary_mean_std_over_seeds(tmp_path):
    runs = {}
    for name, res in {"orig": _results(1.0, 1.0, 1.0, 0.3), "rb0": _results(0.0, 0.5, 0.9, 0.3),
                      "rb1": _results(0.5, 0.5, 0.7, 0.2)}.items():
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps(res))
        runs[name] = d
    out = summarise({"original": [runs["orig"]], "repbend": [runs["rb0"], runs["rb1"]]}, tmp_path / "report")
    rb = out["runs"]["repbend"]
    assert rb["mean"]["asr/direct"] == pytest.approx(0.25) and rb["std"]["asr/direct"] == pytest.approx(0.25)
    assert rb["mean"]["average_asr"] == pytest.approx(0.375)
    assert rb["mean"]["over_refusal/compliance"] == pytest.approx(0.8)
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "| direct | 100.0 | 25.0 ± 25.0 |" in md and "judge `default`" in md
    assert "| capability/benign_kl | 0.026 | 0.026 |" in md           # small KLs keep their digits
    assert (tmp_path / "report" / "asr_by_attack.png").stat().st_size > 1000
    assert (tmp_path / "report" / "asr_vs_capability.png").is_file()
    assert (tmp_path / "report" / "asr_vs_overrefusal.png").is_file()


def test_summary_needs_results(tmp_path):
    with pytest.raises(RepbendError, match="has no results.json"):
        summarise({"x": [tmp_path]}, tmp_path / "r")


def test_pipeline_config_errors_name_fields():
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, data={"output_dir": "x", "methods": ["repbnd"], "seeds": [1, 1]})
    assert "Did you mean 'repbend'" in str(e.value) and "seeds" in str(e.value)


def test_plan_builds_every_stage_without_loading_models(tmp_path):
    cfg = load_config(PipelineConfig, data={"output_dir": str(tmp_path), "methods": ["repbend", "npo"],
                                            "seeds": [0, 1]})
    stages = {s.name: s for s in plan(cfg)}
    names = list(stages)
    assert names[:2] == ["build data", "evaluate eval-original"]
    assert "train npo seed 1" in names and "evaluate eval-npo-s1" in names and len(names) == 2 + 2 * 2 * 3
    # each trained model is analysed against the original: a full model by comparison, an adapter switched off
    full = stages["analyze analysis-repbend-s0"].fingerprint["analyze"]
    assert full["compare_to"] == str(tmp_path / "train-repbend-s0") and full["adapter"] is None
    off = load_config(PipelineConfig, data={"output_dir": str(tmp_path), "analyze_prompts": 0})
    assert not [s for s in plan(off) if s.name.startswith("analyze")]
    # the analysis reads HarmBench's contextual behaviours exactly when the suite evaluates them
    assert full["include_contextual"] is False          # the default suite (quick) has standard behaviours only
    full_suite = load_config(PipelineConfig, data={"output_dir": str(tmp_path), "suite": "full"})
    assert next(s for s in plan(full_suite) if s.name.startswith("analyze")).fingerprint["analyze"]["include_contextual"]


def test_empty_new_training_options_keep_old_fingerprints(tmp_path):
    # a run finished before data.repeat_kinds existed is not retrained; setting it does retrain
    def train_stage(overrides):
        cfg = load_config(PipelineConfig, data={"output_dir": str(tmp_path), "train_overrides": overrides})
        return next(s for s in plan(cfg) if s.name.startswith("train"))

    plain = train_stage([])
    assert "repeat_kinds" not in plain.fingerprint["train"]["data"]
    assert train_stage(["data.repeat_kinds={}"]).key == plain.key
    oversampled = train_stage(["data.repeat_kinds={overrefusal: 3}"])
    assert oversampled.fingerprint["train"]["data"]["repeat_kinds"] == {"overrefusal": 3}
    assert oversampled.key != plain.key
    # how a step is computed (data.passes) never retrains a finished run
    assert "passes" not in plain.fingerprint["train"]["data"]
    assert train_stage(["data.passes=one"]).key == plain.key


def test_full_finetune_evals_measure_kl_against_the_base(tmp_path):
    # a full model has no adapter to switch off: without capability.reference_model its KL was skipped and its
    # perplexity scored on its own answers
    def stages(overrides):
        cfg = load_config(PipelineConfig, data={"output_dir": str(tmp_path), "train_overrides": overrides})
        return {s.name: s for s in plan(cfg)}

    lora, full = stages(["full_finetune=false", "training.lr=5e-4"]), stages([])   # the default is full fine-tuning
    assert full["evaluate eval-repbend-s0"].fingerprint["suite"]["capability"]["reference_model"] == "default"
    assert "reference_model" not in (lora["evaluate eval-repbend-s0"].fingerprint["suite"]["capability"] or {})
    assert full["evaluate eval-original"].key == lora["evaluate eval-original"].key
    suite = load_suite("quick")
    named = suite.model_copy(update={"capability": {**suite.capability, "reference_model": "my-base"}})
    assert with_reference_model(named, "default") is named      # a reference the suite names is kept
    off = suite.model_copy(update={"capability": None})
    assert with_reference_model(off, "default") is off          # no capability stage: nothing to add


def test_evals_measure_benign_kl_on_the_builds_held_out_answers(tmp_path):
    # the project's benign prompts are training requests of the default data build: the pipeline's evaluations
    # take the built dataset's val retain rows instead (the original's answers to held-out benign requests)
    cfg = load_config(PipelineConfig, data={"output_dir": str(tmp_path)})
    evals = [s for s in plan(cfg) if s.name.startswith("evaluate")]
    assert len(evals) == 2
    for st in evals:
        assert st.fingerprint["suite"]["capability"]["benign_data"] == str(tmp_path / "data")
    suite = load_suite("quick")
    named = suite.model_copy(update={"capability": {**suite.capability, "benign_data": "mine"}})
    assert with_heldout_benign(named, tmp_path, 0.1) is named            # the suite's own choice is kept
    off = suite.model_copy(update={"capability": {**suite.capability, "benign_kl": False}})
    assert with_heldout_benign(off, tmp_path, 0.1) is off
    assert with_heldout_benign(suite, tmp_path, 0.0) is suite             # a build without a val part has no rows
    assert with_heldout_benign(suite.model_copy(update={"capability": None}), tmp_path, 0.1).capability is None


def test_plan_rejects_train_config_of_another_method(tmp_path):
    from repbend.paths import CONFIG_DIR

    wrong = tmp_path / "t.yaml"
    wrong.write_text((CONFIG_DIR / "train-default-npo.yaml").read_text())
    cfg = load_config(PipelineConfig, data={"output_dir": str(tmp_path), "methods": ["repbend"],
                                            "train_config": str(wrong)})
    with pytest.raises(RepbendError, match="trains method 'npo'"):
        plan(cfg)
    missing = load_config(PipelineConfig, data={"output_dir": str(tmp_path), "train_config": str(tmp_path / "no.yaml")})
    with pytest.raises(RepbendError, match="does not exist"):
        plan(missing)


def test_core_average_takes_one_value_per_core_family():
    from repbend.pipeline.summary import core_average

    per = {"direct": 0.8, "prefill": 0.6, "templates": 0.2, "embedding_paper": 0.4, "gcg": 1.0,
           "gcg_transfer": 0.0, "obfuscation": 0.0}
    assert core_average(per) == pytest.approx((0.8 + 0.6 + 0.2 + 0.4 + 1.0) / 5)
    assert core_average({"direct": 0.5, "obfuscation": 0.0}) == pytest.approx(0.5)
    assert core_average({"obfuscation": 0.1}) is None


def test_command_line_options_are_set_as_typed_values_not_reparsed(tmp_path):
    from repbend.pipeline.commands import _csv, _load

    cfg = _load("quick", "2024", ["suite=full"], seeds=_csv("1, 2", "--seeds", int), methods=_csv("repbend", "--methods"))
    assert (cfg.seeds, cfg.methods, cfg.suite, cfg.output_dir) == ([1, 2], ["repbend"], "full", "2024")
    assert _load("quick", "on", []).output_dir == "on"       # as an override string it would have read as True
    with pytest.raises(RepbendError, match="--seeds"):
        _csv("0,x", "--seeds", int)


def test_demo_model_option_picks_the_embedded_models_train_config_and_folder():
    from repbend.pipeline.commands import _load, model_values

    mv = model_values("Qwen2.5-Coder-0.5B", "quick", None)
    assert mv == {"model": "qwen2.5-coder-0.5b", "train_config": "train-qwen2.5-coder-0.5b",
                  "output_dir": "runs/demo-quick-qwen2.5-coder-0.5b"}
    cfg = _load("quick", mv.pop("output_dir"), [], **mv)
    stages = plan(cfg)   # the shipped config is valid for that model (layer window inside its 24 blocks)
    train = next(s for s in stages if s.name.startswith("train"))
    assert train.fingerprint["train"]["method"]["params"]["target_start"] == 15
    assert model_values("smollm2-135m", "full", "mine") == {"model": "smollm2-135m", "train_config": "train-default"}
    assert model_values(None, "quick", None) == {}
    with pytest.raises(RepbendError, match="not an embedded model"):
        model_values("org/some-hub-model", "quick", None)


def test_train_stages_get_the_pipeline_values_then_the_users_overrides(tmp_path):
    cfg = PipelineConfig(output_dir=str(tmp_path / "yes"), train_overrides=["training.max_steps=3"])
    train = next(s for s in plan(cfg) if s.name.startswith("train"))
    assert train.fingerprint["train"]["data"]["dir"] == str(tmp_path / "yes" / "data")
    assert train.fingerprint["train"]["training"]["max_steps"] == 3


def test_summary_shows_stage_times_and_generation_speed(tmp_path):
    res = _results(1.0, 1.0, 1.0, 0.3)
    res["meta"] = {"generation": {"tokens_per_s": 123.4, "generated": 50, "seconds": 20.0}}
    (tmp_path / "eval-original").mkdir()
    (tmp_path / "eval-original" / "results.json").write_text(json.dumps(res))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(
        {"timings": {"generate_s": 5.0, "generate_s_all_sessions": 40.0},
         "outputs": {"generations.jsonl": {"rows": 80}}}))
    out = summarise({"original": [tmp_path / "eval-original"]}, tmp_path / "report",
                    timings={"build data": 60.0, "evaluate eval-original": 30.0}, data_dir=tmp_path / "data")
    md = out["markdown"]
    assert "| **total** | **90** |" in md
    assert "| build data | 80 | 40 | 2.00 | – |" in md
    assert "| evaluate eval-original | 50 | 20 | 2.50 | 123.4 |" in md
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["generation"]["build data"]["requests"] == 80


def test_demo_builds_only_the_rows_its_training_draws(tmp_path):
    def stages(overrides, **extra):
        cfg = load_config(PipelineConfig, data={"output_dir": str(tmp_path), "train_overrides": overrides, **extra})
        return {s.name: s for s in plan(cfg)}

    short = stages(["training.max_steps=10"])
    budget = short["build data"].fingerprint["data"]["rows_needed"]
    # 10 steps x 2 rows per split, rounded up to whole length-bucketing windows (16 batches of 2 rows)
    # val: only the held-out requests of the 16 val retain rows the quick suite's benign KL reads
    assert budget == {"draws": [{"seed": 0, "safe": 32, "unsafe": 32, "retain": 32, "repeat_kinds": {}}],
                      "margin": 0.1, "window": 64, "val_retain": 16}
    validating = stages(["training.max_steps=10", "training.eval_every=5"])   # the validation loss reads all of val
    assert validating["build data"].fingerprint["data"]["rows_needed"]["val_retain"] is None
    no_kl = stages(["training.max_steps=10"], suite_overrides=["capability.benign_kl=false"])
    assert no_kl["build data"].fingerprint["data"]["rows_needed"]["val_retain"] == 0
    kept = stages(["training.max_steps=10"], data_overrides=["rows_needed.val_retain=null"])   # the user's choice wins
    assert kept["build data"].fingerprint["data"]["rows_needed"]["val_retain"] is None
    longer = stages(["training.max_steps=30"], seeds=[0, 1])
    assert [d["unsafe"] for d in longer["build data"].fingerprint["data"]["rows_needed"]["draws"]] == [64, 64]
    assert [d["seed"] for d in longer["build data"].fingerprint["data"]["rows_needed"]["draws"]] == [0, 1]
    assert longer["train repbend seed 0"].fingerprint["data"] == longer["build data"].fingerprint["data"]
    plain = stages(["training.max_steps=10", "data.length_bucketing=false", "data.repeat_kinds={harmful: 2}"])
    assert plain["build data"].fingerprint["data"]["rows_needed"]["draws"] == [
        {"seed": 0, "safe": 20, "unsafe": 20, "retain": 20, "repeat_kinds": {"harmful": 2}}]
    everything = stages([], build_only_needed=False)   # the whole pool, as `repbend data build`
    assert everything["build data"].fingerprint["data"]["rows_needed"] is None
    # the budget's options from data_overrides; its draws still come from the training configs
    opts = stages(["training.max_steps=10"], data_overrides=["rows_needed.margin=0.5", "generation.batch_size=16"])
    data = opts["build data"].fingerprint["data"]
    assert data["rows_needed"] == {**budget, "margin": 0.5} and data["generation"]["batch_size"] == 16
    fixed = stages([], data_overrides=["rows_needed.draws=[{seed: 4, unsafe: 7}]"])   # draws the user gives are kept
    assert fixed["build data"].fingerprint["data"]["rows_needed"]["draws"][0]["unsafe"] == 7
    with pytest.raises(ConfigError, match="rows_needed.margin"):
        stages([], data_overrides=["rows_needed.margin=-1"])


def test_summary_links_the_analysis_of_each_trained_model(tmp_path):
    (tmp_path / "eval-original").mkdir()
    (tmp_path / "eval-original" / "results.json").write_text(json.dumps(_results(1.0, 1.0, 1.0, 0.3)))
    done, missing = tmp_path / "analysis-repbend-s0", tmp_path / "analysis-repbend-s1"
    done.mkdir()
    (done / "summary.md").write_text("# analysis")
    (done / "bending.png").write_bytes(b"png")
    out = summarise({"original": [tmp_path / "eval-original"]}, tmp_path / "report", analyses=[done, missing])
    md = out["markdown"]
    assert "[../analysis-repbend-s0/summary.md](../analysis-repbend-s0/summary.md)" in md
    assert "![bending.png](../analysis-repbend-s0/bending.png)" in md and "separability.png" not in md
    assert "analysis-repbend-s1" not in md     # an analysis that did not run is not linked


def test_eval_dtype_reaches_the_evaluation_stages_only_when_set(tmp_path):
    def evals(**extra):
        cfg = load_config(PipelineConfig, data={"output_dir": str(tmp_path), **extra})
        return [s for s in plan(cfg) if s.name.startswith("evaluate")]

    assert all("dtype" not in s.fingerprint for s in evals())          # finished evaluations stay valid
    bf16 = evals(eval_dtype="bfloat16")
    assert bf16 and all(s.fingerprint["dtype"] == "bfloat16" for s in bf16)
    assert {s.key for s in bf16}.isdisjoint({s.key for s in evals()})   # another dtype is another evaluation


def test_summary_names_the_machine_its_stage_times_come_from(tmp_path):
    """The stage table carries the machine line (processor, threads, vector extension, measured fp32 matmul rate),
    so wall times from different machines can be scaled; summary.json keeps the measurement."""
    from repbend.machine import describe, machine_info

    (tmp_path / "eval-original").mkdir()
    (tmp_path / "eval-original" / "results.json").write_text(json.dumps(_results(1.0, 1.0, 1.0, 0.3)))
    info = machine_info(seconds=0.05)
    assert info["fp32_matmul_gflops"] > 0 and info["cpu"] and info["threads"] >= 1
    out = summarise({"original": [tmp_path / "eval-original"]}, tmp_path / "report", timings={"build data": 3.0},
                    machine=info)
    assert f"Machine: {describe(info)}." in out["markdown"] and "GFLOP/s (1024^3)" in out["markdown"]
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["machine"] == info
