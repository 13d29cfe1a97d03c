"""Hyper-parameter search on VALIDATION data: train each trial, evaluate it with a tuning suite, rank.

A sweep file (YAML) names a base train config, a tuning suite and the trials::

    train_config: train-default          # base config (name under configs/ or a path)
    suite: tune                          # HarmBench validation behaviours + over-refusal TRAIN half
    baseline: true                       # also evaluate the original model (the reference for the limits)
    grid:                                # cartesian product of override lists ...
      training.lr: [3.0e-5, 5.0e-5]
      method.params.epsilon: [0.3, 1.0]
    trials:                              # ... and/or explicit trials
      - {name: mid-layers, overrides: [method.params.target_start=10]}
      - {name: demo, overrides: [], reuse: "runs/demo/train-repbend-s{seed}"}   # evaluate a finished run
    seeds: [0, 1, 2]                     # optional: every trial once per training seed, ranked on the mean
    select:                              # how the winner is chosen (see :func:`rank`)
      max_overrefusal_drop: 0.05
      max_benign_drop: 0.05
      max_kl: 0.5

Each trial lands in ``<out>/<trial>/{train,eval}``; one line per finished trial goes to
``<out>/trials.jsonl`` (the sweep resumes: finished trials are skipped). With ``seeds`` each trial runs
once per seed as ``<trial>@s<seed>``, and ranking averages every rate over the seeds (a single seed
is a poor guide when seeds differ by 20 ASR points). ``reuse`` evaluates a finished training run of the
same settings (checked, see :func:`reusable_run`) instead of training it again. ``workers > 1`` runs trials in
parallel processes (useful on a GPU, where one small model leaves most of the device idle).

``rejudge`` re-scores every trial's saved completions with another judge (e.g. the default judge on a
CPU after a GPU sweep scored with the dependency-free refusal judge) without generating anything
again. ``report`` writes ``tuning.md``/``tuning.json`` and ``tuning.png`` (ASR against over-refusal
compliance and benign KL, the chosen trial marked).
"""
from __future__ import annotations

from repbend.pipeline.tune.config import BASELINE, TRIALS_FILE, SelectConfig, SweepConfig, load_sweep
from repbend.pipeline.tune.rank import aggregate, fallback_choice, rank
from repbend.pipeline.tune.report import markdown, report
from repbend.pipeline.tune.run import done_trials, headline, rejudge, run_sweep, run_trial
from repbend.pipeline.tune.trials import check, expand, reusable_run, train_config, trial_slug

__all__ = ["BASELINE", "TRIALS_FILE", "SelectConfig", "SweepConfig", "aggregate", "check", "done_trials", "expand",
           "fallback_choice", "headline", "load_sweep", "markdown", "rank", "rejudge", "report", "reusable_run",
           "run_sweep", "run_trial", "train_config", "trial_slug"]
