"""Reading a built dataset folder (``repbend data build`` output), with the schema checked on read.

Folder: ``manifest.json`` (written last; its absence means an unfinished build), ``train.jsonl``,
``val.jsonl``. Each row has exactly these fields::

    id        unique string
    split     "safe" | "unsafe" | "retain"
    kind      "benign" | "overrefusal" (split safe or retain), "refusal" (safe), "harmful" (unsafe)
    messages  [{"role": ..., "content": ...}, ...]   the request (non-empty)
    response  the answer (non-empty string)
    source    the source name of the request (e.g. advbench)
    pair_id   shared by the rows of one harmful request (its SAFE refusal and UNSAFE answer), else null

Any other or missing field, a wrong value, a non-UTF-8 file or an empty train file is a one-line
:class:`RepbendError` naming the file and line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from repbend.errors import RepbendError
from repbend.io import read_jsonl_numbered, sha256_file

FIELDS = ("id", "split", "kind", "messages", "response", "source", "pair_id")
SPLITS = ("safe", "unsafe", "retain")
KIND_SPLITS = {"benign": {"safe", "retain"}, "overrefusal": {"safe", "retain"}, "refusal": {"safe"},
               "harmful": {"unsafe"}}


def check_row(row: object, where: str) -> None:
    """Raise a one-line RepbendError if ``row`` does not follow the schema (``where``: 'file line N')."""
    if not isinstance(row, dict):
        raise RepbendError(f"{where}: a row must be a JSON object.")
    missing = [f for f in FIELDS if f not in row]
    extra = sorted(set(row) - set(FIELDS))
    if missing or extra:
        raise RepbendError(f"{where}: missing field(s) {missing} / extra field(s) {extra}; "
                           f"rows have exactly {', '.join(FIELDS)}.")
    if not isinstance(row["id"], str) or not row["id"]:
        raise RepbendError(f"{where}: id must be a non-empty string.")
    if row["split"] not in SPLITS:
        raise RepbendError(f"{where}: split must be one of {', '.join(SPLITS)}, not {row['split']!r}.")
    if row["split"] not in KIND_SPLITS.get(row["kind"], ()):
        raise RepbendError(f"{where}: kind {row['kind']!r} cannot be in split {row['split']!r} "
                           f"(kinds: {', '.join(f'{k}->{sorted(v)}' for k, v in KIND_SPLITS.items())}).")
    msgs = row["messages"]
    if (not isinstance(msgs, list) or not msgs or any(
            not isinstance(m, dict) or set(m) != {"role", "content"} or not isinstance(m["role"], str)
            or not isinstance(m["content"], str) for m in msgs)):
        raise RepbendError(f"{where}: messages must be a non-empty list of {{'role', 'content'}} string objects.")
    if not isinstance(row["response"], str) or not row["response"].strip():
        raise RepbendError(f"{where}: response must be a non-empty string.")
    if not isinstance(row["source"], str):
        raise RepbendError(f"{where}: source must be a string.")
    if row["pair_id"] is not None and not isinstance(row["pair_id"], str):
        raise RepbendError(f"{where}: pair_id must be a string or null.")


def read_rows(path: Path, allow_empty: bool = False) -> list[dict]:
    if not path.is_file():
        raise RepbendError(f"{path} is missing; rebuild the dataset with repbend data build.")
    rows, ids = [], set()
    for i, row in read_jsonl_numbered(path, fix="re-save it as UTF-8 or rebuild"):
        check_row(row, f"{path} line {i}")
        if row["id"] in ids:
            raise RepbendError(f"{path} line {i}: duplicate id {row['id']!r}.")
        ids.add(row["id"])
        rows.append(row)
    if not rows and not allow_empty:
        raise RepbendError(f"{path} has no rows; rebuild the dataset with repbend data build.")
    return rows


@dataclass
class BuiltDataset:
    path: Path
    manifest: dict
    train: list[dict]
    val: list[dict] = field(default_factory=list)

    def rows(self, split: str, part: str = "train") -> list[dict]:
        """Rows of one split (safe / unsafe / retain) from the train or val part."""
        if split not in SPLITS:
            raise RepbendError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
        if part not in ("train", "val"):
            raise RepbendError(f"Unknown part {part!r}; choose train or val.")
        return [r for r in getattr(self, part) if r["split"] == split]

    def pairs(self, part: str = "train") -> list[tuple[dict, dict]]:
        """(SAFE refusal, UNSAFE answer) row pairs of the same harmful request."""
        rows = getattr(self, part)
        safe: dict[str, dict] = {}
        for r in rows:  # prefer the project-written refusal (id '...#refusal:...')
            if r["split"] == "safe" and r["pair_id"] and (r["pair_id"] not in safe or "#refusal:" in r["id"]):
                safe[r["pair_id"]] = r
        return [(safe[r["pair_id"]], r) for r in rows
                if r["split"] == "unsafe" and r["pair_id"] in safe]

    def __len__(self) -> int:
        return len(self.train) + len(self.val)


def load_built(path: str | Path, verify_checksums: bool = True) -> BuiltDataset:
    """Load and validate a built dataset folder."""
    d = Path(path)
    if not d.is_dir():
        raise RepbendError(f"Dataset folder {d} does not exist; build one with repbend data build --output {d}.")
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise RepbendError(f"{d} has no manifest.json (an unfinished or foreign build); re-run repbend data build.")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RepbendError(f"{mpath} is not valid UTF-8 JSON; rebuild the dataset.") from None
    outputs = manifest.get("outputs", {})
    if verify_checksums:
        for name in ("train.jsonl", "val.jsonl"):
            want = outputs.get(name, {}).get("sha256")
            if want and (d / name).is_file() and sha256_file(d / name) != want:
                raise RepbendError(f"{d / name} differs from the checksum in manifest.json (edited or half-written); "
                                   f"rebuild, or load with verify_checksums=False.")
    train = read_rows(d / "train.jsonl")
    val_path = d / "val.jsonl"
    val = read_rows(val_path, allow_empty=True) if val_path.is_file() else []
    return BuiltDataset(d, manifest, train, val)
