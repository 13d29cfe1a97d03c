"""The end-to-end jobs: ``compare`` (several methods, same data/budget/suite) and ``demo`` (RepBend on the
default model). Both are the same staged pipeline::

    data build -> evaluate original -> for each method and seed: train -> evaluate -> side-by-side report

Every stage writes into its own folder under ``output_dir``; finished stages are skipped on a re-run
(see :mod:`repbend.pipeline.stages`), and unfinished ones resume through their own resume logic.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from repbend.config import Section, load_config, read_yaml, set_values
from repbend.errors import RepbendError
from repbend.io import UserPath, write_run_info
from repbend.paths import resolve_config
from repbend.pipeline.stages import Stage, run_stages
from repbend.pipeline.summary import summarise


class PipelineConfig(Section):
    model: str = Field("default", description="Model to defend: alias, hub id or folder.")
    methods: list[str] = Field(["repbend"], description="Methods to train (registry METHODS).")
    seeds: list[int] = Field([0], description="Training seeds; results are reported as mean ± std over them.")
    data_config: str = Field("data-default", description="Data build config (name under configs/ or a path).")
    train_config: str = Field("train-default", description="Train config for RepBend; other methods use "
                                                           "'<train_config>-<method>' (name or path).")
    train_overrides: list[str] = Field([], description="Overrides applied to every method's train config "
                                                       "(e.g. training.max_steps=100 for a common budget).")
    suite: str = Field("quick", description="Evaluation suite (quick, full, or a path).")
    suite_overrides: list[str] = Field([], description="Overrides for the suite.")
    output_dir: UserPath = Field(..., description="Folder holding every stage's output and the final report.")
    data_overrides: list[str] = Field([], description="Overrides for the data build config (e.g. "
                                                      "rows_needed.margin=0.5 or generation.batch_size=16).")
    build_only_needed: bool = Field(True, description="true: the data build answers only the validation requests the "
                                                      "evaluations read (all of them when a run's eval_every is set) and "
                                                      "the training requests whose rows the training runs draw (plus "
                                                      "a margin); the runs draw exactly the rows a whole-pool build "
                                                      "would give them (docs/DATA.md). false: every request (what "
                                                      "`repbend data build` does).")
    eval_dtype: str | None = Field(None, description="Model dtype of the evaluations (null = the loader's choice: "
                                                     "bfloat16 on a GPU, float32 on a CPU); see docs/PERFORMANCE.md "
                                                     "for how bf16 answers differ from fp32 ones.")
    analyze_prompts: int = Field(24, ge=0, description="Prompts per kind for the representation analysis of each "
                                                      "trained model against the original (`repbend analyze`: "
                                                      "separability, bending, logit lens, PCA); 0 = no analysis.")

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        from repbend.methods import METHODS

        for m in v:
            try:
                METHODS.get(m)
            except RepbendError as e:  # report it with the other field errors
                raise ValueError(str(e)) from None
        if not v or len(set(v)) != len(v):
            raise ValueError("list each method once (at least one)")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError("give at least one seed, each once")
        return v


# Training options added after a release whose empty value trains exactly as before the option existed: left out
# of a train stage's fingerprint while empty, so finished runs of older versions are not retrained.
_NEUTRAL_WHEN_EMPTY = (("data", "repeat_kinds"),)
# How a step is computed, not what is trained (the same loss; rounding may differ like another thread count):
# never part of a fingerprint.
_EXECUTION_ONLY = (("data", "passes"),)


def train_fingerprint(tcfg) -> dict:
    """A training config's dump for stage fingerprints (see ``_NEUTRAL_WHEN_EMPTY``, ``_EXECUTION_ONLY``)."""
    dump = tcfg.model_dump(mode="json")
    for section, key in _NEUTRAL_WHEN_EMPTY:
        if not dump[section][key]:
            del dump[section][key]
    for section, key in _EXECUTION_ONLY:
        dump[section].pop(key, None)
    return dump


def _train_config_path(cfg: PipelineConfig, method: str) -> Path:
    if method == "repbend":
        return resolve_config(cfg.train_config)
    base = Path(cfg.train_config)
    name = f"{base.with_suffix('')}-{method}" + (".yaml" if base.suffix else "")
    return resolve_config(name)


def train_or_resume(tcfg) -> None:
    """Train ``tcfg``, resuming from the run's last checkpoint if there is one (a run cut before its first
    checkpoint restarts). What the pipeline's train stages and the tuning sweep's trials call."""
    import shutil

    from repbend.training import train
    from repbend.training.checkpoint import checkpoints

    run = Path(tcfg.output_dir)
    has_ckpt = bool(checkpoints(run))
    if not has_ckpt and run.is_dir():
        shutil.rmtree(run)  # only steps before the first checkpoint are lost
    train(tcfg, resume=has_ckpt)


def with_reference_model(suite, base: str):
    """``suite`` for a fully fine-tuned model: benign KL and perplexity need the original model, and a full
    model has no adapter to switch off, so ``capability.reference_model`` names ``base`` (unless the suite
    names one). Without it the capability stage would skip KL and score the trained model's perplexity on
    its OWN answers, not comparable with the original's."""
    if suite.capability is None or suite.capability.get("reference_model"):
        return suite
    return suite.model_copy(update={"capability": {**suite.capability, "reference_model": base}})


def with_heldout_benign(suite, data_dir: Path, val_fraction: float):
    """``suite`` whose benign KL / perplexity use the pipeline's built dataset's val retain rows: the original
    model's answers to benign requests held out of training (unless the suite names ``benign_data`` or turns the
    KL off). Without it the capability stage generates the original's answers to the project's benign prompts,
    which the default data build also trains on."""
    cap = suite.capability
    if cap is None or not cap.get("benign_kl", True) or cap.get("benign_data") or val_fraction <= 0:
        return suite
    return suite.model_copy(update={"capability": {**cap, "benign_data": str(data_dir)}})


def plan(cfg: PipelineConfig) -> list[Stage]:
    """Build the list of stages (validating every config up front, before any model is loaded)."""
    from repbend.data.build import build_dataset
    from repbend.data.build_config import RowBudget, load_build_config
    from repbend.evaluation.runner import EvalConfig, evaluate
    from repbend.evaluation.suites import load_suite
    from repbend.training import TrainConfig

    out = Path(cfg.output_dir)
    data_dir = out / "data"
    data_cfg = load_build_config(str(resolve_config(cfg.data_config)))
    raw = {**data_cfg.model_dump(mode="json"), "model": cfg.model}
    if raw.get("rows_needed") is None:   # so that an override like rows_needed.margin=0.5 makes the section
        raw.pop("rows_needed", None)
    data_cfg = load_config(type(data_cfg), data=raw, overrides=list(cfg.data_overrides))
    train_cfgs = []
    suite = with_heldout_benign(load_suite(cfg.suite, list(cfg.suite_overrides)), data_dir, data_cfg.val_fraction)
    suite_fp = suite.model_dump(mode="json")

    def eval_stage(name: str, adapter: Path | None, model: str | None = None) -> Stage:
        d = out / name
        s = with_reference_model(suite, cfg.model) if model else suite   # a full model: KL against the base
        ecfg = EvalConfig(model=model or cfg.model, adapter=str(adapter) if adapter else None, suite=s,
                          output_dir=str(d), dtype=cfg.eval_dtype)
        fp = {"model": model or cfg.model, "adapter": str(adapter),
              "suite": suite_fp if s is suite else s.model_dump(mode="json")}
        if cfg.eval_dtype:   # left out while unset: finished evaluations of older versions are not redone
            fp["dtype"] = cfg.eval_dtype
        return Stage(f"evaluate {name}", d, lambda: evaluate(ecfg), fp)

    def analyze_stage(d: Path, run: Path, full_finetune: bool) -> Stage:
        from repbend.analysis import AnalyzeConfig, analyze

        acfg = AnalyzeConfig(model=cfg.model, output_dir=str(d), max_prompts=cfg.analyze_prompts, lens_prompts=1,
                             include_contextual=suite_contextual(suite),
                             **({"compare_to": str(run)} if full_finetune else {"adapter": str(run)}))
        return Stage(f"analyze {d.name}", d, lambda: analyze(acfg), {"analyze": acfg.model_dump(mode="json")})

    stages = [Stage("build data", data_dir, lambda: build_dataset(data_cfg, data_dir), {"data": data_cfg}),
              eval_stage("eval-original", None)]
    for method in cfg.methods:
        path = _train_config_path(cfg, method)
        raw = read_yaml(path)
        for seed in cfg.seeds:
            run = out / f"train-{method}-s{seed}"
            own = set_values(raw, {"model.name": cfg.model, "data.dir": str(data_dir), "output_dir": str(run),
                                   "training.seed": seed})
            tcfg = load_config(TrainConfig, data=own, overrides=cfg.train_overrides)   # the user's overrides win
            if tcfg.method.name != method:
                raise RepbendError(f"{path} trains method {tcfg.method.name!r}, but it was chosen for {method!r}; "
                                   f"point --train-config at the right file.")
            train_cfgs.append(tcfg)
            stages.append(Stage(f"train {method} seed {seed}", run, lambda t=tcfg: train_or_resume(t),
                                {"train": train_fingerprint(tcfg), "data": data_cfg}))
            # the run folder holds the final adapter (LoRA) or the full weights (full fine-tuning)
            if tcfg.full_finetune:
                stages.append(eval_stage(f"eval-{method}-s{seed}", None, model=str(run)))
            else:
                stages.append(eval_stage(f"eval-{method}-s{seed}", run))
            if cfg.analyze_prompts:
                stages.append(analyze_stage(out / f"analysis-{method}-s{seed}", run, tcfg.full_finetune))
    if cfg.build_only_needed:
        given = data_cfg.rows_needed
        if given is None or not given.draws:   # only the budget's options given (margin, window): draws from training
            data_cfg.rows_needed = (given or RowBudget()).model_copy(update={"draws": draws(train_cfgs)})
        if "val_retain" not in data_cfg.rows_needed.model_fields_set:   # unless the user set it
            data_cfg.rows_needed = data_cfg.rows_needed.model_copy(
                update={"val_retain": val_rows_read(suite, data_dir, train_cfgs)})
    dump = data_cfg.model_dump(mode="json")   # the stages' fingerprints see the final data config
    for st in stages:
        for k, v in st.fingerprint.items():
            if v is data_cfg:
                st.fingerprint[k] = dump
    return stages


def suite_contextual(suite) -> bool:
    """Whether the suite evaluates HarmBench's contextual behaviours (the analysis then reads them too)."""
    return any(b.get("include_contextual", True) for b in suite.benchmarks if b.get("name") == "harmbench") \
        or not any(b.get("name") == "harmbench" for b in suite.benchmarks)


def val_rows_read(suite, data_dir: Path, train_cfgs) -> int | None:
    """How many val retain rows the pipeline reads (the evaluations' benign KL), or None when a training run's
    validation loss (``eval_every``) reads the whole val split."""
    from repbend.evaluation.capability import CapabilityConfig

    if any(t.training.eval_every > 0 for t in train_cfgs):
        return None
    cap = suite.capability
    if cap is None or not cap.get("benign_kl", True) or cap.get("benign_data") != str(data_dir):
        return 0
    return int(cap.get("benign_n", CapabilityConfig.model_fields["benign_n"].default))


def draws(train_cfgs) -> list:
    """What the training runs draw (one entry per distinct run; :func:`repbend.training.data.draws_of`)."""
    from repbend.training.data import draws_of

    out: list = []
    for t in train_cfgs:
        if (d := draws_of(t)) not in out:
            out.append(d)
    return out


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run (or resume) the whole pipeline and write ``summary.json`` / ``summary.md`` + plots."""
    from repbend.machine import machine_info

    out = Path(cfg.output_dir)
    stages = plan(cfg)
    machine = machine_info()       # the stage times' scale: processor and a measured matmul rate
    write_run_info(out, cfg, machine=machine)
    timings = run_stages(stages)
    runs = {"original": [out / "eval-original"]}
    for m in cfg.methods:
        runs[m] = [out / f"eval-{m}-s{s}" for s in cfg.seeds]
    analyses = [out / f"analysis-{m}-s{s}" for m in cfg.methods for s in cfg.seeds] if cfg.analyze_prompts else []
    return summarise(runs, out / "report", timings=timings, data_dir=out / "data", analyses=analyses,
                     machine=machine)
