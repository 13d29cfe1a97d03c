"""repbend: representation bending for LLM safety.

The public Python API, importable from the package root (each also has a CLI command)::

    from repbend import build_dataset, train, evaluate, run_pipeline

- ``load_model(spec, adapter=None, ...) -> (model, tokenizer)``, ``resolve_model``   (``repbend models``, ``repbend chat``)
- ``build_dataset(DataBuildConfig, out_dir) -> manifest``; ``load_build_config(path, overrides)`` (``repbend data build``)
- ``train(TrainConfig, resume=False) -> run folder``; ``merge(adapter, output)``     (``repbend train``, ``repbend merge``)
- ``evaluate(EvalConfig) -> Results``; ``load_suite(name_or_path, overrides)``       (``repbend eval``)
- ``write_report(results, out_dir)``, ``compare_runs(run_dirs, out_dir)``           (``repbend report``)
- ``run_pipeline(PipelineConfig) -> summary``                                      (``repbend demo``, ``repbend compare``)
- ``analyze(``AnalyzeConfig``) -> summary``                                          (``repbend analyze``)
- ``load_config(ConfigClass, path, overrides)``, ``validate_config(path)``           (``repbend validate``)

Names are imported on first use, so ``import repbend`` (and ``repbend --help``) loads no heavy library.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API: dict[str, str] = {
    "load_model": "repbend.models", "resolve_model": "repbend.models",
    "DataBuildConfig": "repbend.data.build_config", "load_build_config": "repbend.data.build_config",
    "build_dataset": "repbend.data.build",
    "TrainConfig": "repbend.training", "train": "repbend.training", "merge": "repbend.training",
    "EvalConfig": "repbend.evaluation.runner", "evaluate": "repbend.evaluation.runner",
    "Suite": "repbend.evaluation.suites", "load_suite": "repbend.evaluation.suites",
    "Results": "repbend.evaluation.results",
    "write_report": "repbend.evaluation.report", "compare_runs": "repbend.evaluation.report_compare",
    "PipelineConfig": "repbend.pipeline.jobs", "run_pipeline": "repbend.pipeline.jobs",
    "AnalyzeConfig": "repbend.analysis", "analyze": "repbend.analysis",
    "load_config": "repbend.config", "validate_config": "repbend.validate",
    "RepbendError": "repbend.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'repbend' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
