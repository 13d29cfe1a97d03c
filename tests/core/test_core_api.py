"""The public API at the package root, `repbend validate` for every config kind, and the layering rules."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import repbend
from repbend.cli import main
from repbend.paths import CONFIG_DIR, shipped_names
from repbend.validate import CONFIG_KINDS, validate_config

SRC = Path(repbend.__file__).parent


def test_every_advertised_name_exists_and_is_what_the_docs_say():
    from repbend.evaluation.results import Results
    from repbend.evaluation.runner import evaluate
    from repbend.training import train

    for name in repbend.__all__:
        assert getattr(repbend, name) is not None, name
        assert f"``{name}" in repbend.__doc__ or name in ("__version__", "DataBuildConfig", "TrainConfig", "EvalConfig",
                                                          "Suite", "Results", "PipelineConfig", "RepbendError"), name
    from repbend import build_dataset, evaluate as ev, run_pipeline, train as tr  # noqa: F401
    assert ev is evaluate and tr is train and repbend.Results is Results
    with pytest.raises(AttributeError):
        repbend.does_not_exist  # noqa: B018


def test_importing_the_package_loads_no_heavy_library():
    code = "import sys, repbend, repbend.cli; print(any(m in sys.modules for m in ('torch', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


SHIPPED = [(n, "") for n in shipped_names() if not n.startswith(("llama3", "mistral"))] + \
          [(n, "suites") for n in shipped_names("suites")]


@pytest.mark.parametrize("name, sub", SHIPPED)
def test_validate_knows_every_shipped_config(name, sub, tmp_path):
    (tmp_path / "train.jsonl").write_text("")       # the one check that needs a file: the built data
    kind, errors = validate_config(name, [f"data.dir={tmp_path}"] if name.startswith("train-") else [])
    assert errors == [], (name, errors)
    prefix = {"train": "train-", "data": "data-", "pipeline": "pipeline-", "sweep": "tune-"}
    assert kind == "suite" if sub == "suites" else name.startswith(prefix[kind]), (name, kind)


@pytest.mark.parametrize("kind, text, fragment", [
    ("suite", "benchmarks: [{name: harmbench}]\nattacks: [{name: steering, n_train: 0}]\n", "n_train"),
    ("pipeline", "methods: [repbend]\ndata_config: nope\noutput_dir: x\n", "nope"),
    ("sweep", "grid: {training.lr: [.inf]}\n", "training.lr"),
    ("data", "val_fraction: 2\n", "val_fraction"),
])
def test_validate_reports_errors_of_every_kind(tmp_path, capsys, kind, text, fragment):
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text)
    found, errors = validate_config(path)
    assert found == kind and any(fragment in e for e in errors), errors
    with pytest.raises(SystemExit) as e:
        main(["validate", str(path)])
    assert e.value.code == 2 and fragment in capsys.readouterr().err


def test_config_kinds_have_distinct_keys():
    kinds = list(CONFIG_KINDS.values())
    for i, a in enumerate(kinds):
        for b in kinds[i + 1:]:
            assert not a.keys & b.keys


# Lower layers never import higher ones (function-level imports included).
LAYERS = {"errors": 0, "registry": 0, "config": 0, "io": 0, "cache": 0, "seeding": 0, "paths": 0, "layers": 0, "refusals": 0,
          "methods": 1, "models": 1, "data": 2, "training": 3, "evaluation": 3, "analysis": 4, "pipeline": 4,
          "validate": 5, "cli": 5, "__init__": 5}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("repbend."):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("repbend.")}
    return out


def _area(module_path: str) -> str:
    return module_path.split(".")[1] if "." in module_path else "__init__"


def test_no_upward_imports():
    bad = []
    for f in SRC.rglob("*.py"):
        rel = f.relative_to(SRC.parent).with_suffix("")
        area = rel.parts[1] if len(rel.parts) > 1 else "__init__"
        area = area if area in LAYERS else area.removesuffix(".py")
        for target in _imports(f):
            t = _area(target)
            if t in LAYERS and area in LAYERS and LAYERS[t] > LAYERS[area]:
                bad.append(f"{'.'.join(rel.parts)} -> {target}")
    assert bad == []


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    for f in SRC.rglob("*.py"):
        rel = f.relative_to(SRC.parent).with_suffix("")
        mod = ".".join(rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts)
        graph[mod] = _imports(f)
    graph = {m: {t for t in ts if t in graph and t != m and not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


@pytest.mark.parametrize("attack", ["{name: steering, n_train: 0}", "{name: refusal_ablation, n_val: 0}",
                                    "{name: relearn, lr: 0}", "{name: gcg, steps: 0}", "{name: embedding, samples: -1}"])
def test_eval_validate_only_rejects_non_positive_attack_budgets(tmp_path, capsys, attack):
    path = tmp_path / "s.yaml"
    path.write_text(f"benchmarks: [{{name: harmbench}}]\nattacks: [{attack}]\n")
    with pytest.raises(SystemExit) as e:
        main(["eval", "-o", str(tmp_path / "out"), "-s", str(path), "--validate-only"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "greater than 0" in err and err.count("\n") == 1
