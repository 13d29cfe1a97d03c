"""A tiny stage runner for the end-to-end jobs (demo, compare).

Each stage writes into its own sub-folder and is marked done by a ``.stage-done.json`` file written
atomically at its end, holding the stage's fingerprint (the config it ran with). A re-run skips
stages whose marker matches, re-runs those whose inputs changed, and resumes an interrupted stage
through that stage's own resume logic (data build, training and evaluation are all resumable).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from repbend.io import atomic_write_json, sha256_text

console = Console(stderr=True)
MARKER = ".stage-done.json"


@dataclass
class Stage:
    name: str
    out_dir: Path
    run: Callable[[], Any]
    fingerprint: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return sha256_text(json.dumps(self.fingerprint, sort_keys=True, default=str))[:16]

    def done(self) -> bool:
        marker = self.out_dir / MARKER
        if not marker.is_file():
            return False
        try:
            return json.loads(marker.read_text()).get("key") == self.key
        except (OSError, json.JSONDecodeError):
            return False


def run_stages(stages: list[Stage]) -> dict[str, float]:
    """Run the stages in order, skipping finished ones; returns wall seconds per stage (0 = skipped)."""
    timings: dict[str, float] = {}
    for i, st in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {st.name}"
        if st.done():
            prev = json.loads((st.out_dir / MARKER).read_text())
            console.print(f"[green]{head}: done already ({prev.get('seconds', 0):.0f} s) — skipped[/green]")
            timings[st.name] = float(prev.get("seconds", 0.0))
            continue
        console.rule(head)
        t0 = time.time()
        st.out_dir.mkdir(parents=True, exist_ok=True)
        st.run()
        secs = time.time() - t0
        atomic_write_json(st.out_dir / MARKER, {"key": st.key, "seconds": round(secs, 1),
                                                 "fingerprint": st.fingerprint})
        console.print(f"[green]{head}: finished in {secs:.0f} s[/green]")
        timings[st.name] = secs
    return timings
