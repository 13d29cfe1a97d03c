"""User-provided data: local JSONL/CSV files (``file``) and hub data sets (``hf``, needs ``repbend[hub]``).

Fields a user file may hold (docs/DATA.md)::

    prompt    (required) the request text
    response  an answer to use (e.g. your own refusals or helpful answers)
    id        a unique id (default: the row number)
    category  a label kept in the manifest
    context   extra context shown before the request (HarmBench style)
    target    an affirmative target ("Sure, here is ...")

Any other field is an error unless ``ignore_extra`` is set; ``fields`` maps these names to the
names your file uses (e.g. ``{prompt: goal}``).
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from repbend.config import Section
from repbend.data.sources import Source, make_row, read_csv, read_jsonl_rows
from repbend.errors import RepbendError
from repbend.io import sha256_file

USER_FIELDS = ("prompt", "response", "id", "category", "context", "target")


def _rows_from_records(name: str, records: list[tuple[int, dict]], fields: dict[str, str], ignore_extra: bool,
                       prov: dict, where: str) -> list[dict]:
    unknown_map = set(fields) - set(USER_FIELDS)
    if unknown_map:
        raise RepbendError(f"{name}.fields: unknown field(s) {sorted(unknown_map)}; map only {', '.join(USER_FIELDS)}.")
    theirs = {ours: fields.get(ours, ours) for ours in USER_FIELDS}
    known = set(theirs.values())
    out, seen = [], set()
    for line, rec in records:
        extra = sorted(set(rec) - known)
        if extra and not ignore_extra:
            raise RepbendError(f"{where} row {line}: unknown field(s) {extra}; allowed: {', '.join(sorted(known))} "
                               f"(or set ignore_extra: true).")
        prompt = rec.get(theirs["prompt"])
        if not isinstance(prompt, str) or not prompt.strip():
            raise RepbendError(f"{where} row {line}: field {theirs['prompt']!r} (the prompt) is missing or empty.")
        oid = str(rec.get(theirs["id"]) or line)
        if oid in seen:
            raise RepbendError(f"{where} row {line}: duplicate id {oid!r}; ids must be unique.")
        seen.add(oid)
        get = lambda k: (str(rec[theirs[k]]) if rec.get(theirs[k]) not in (None, "") else None)  # noqa: E731
        out.append(make_row(name, oid, prompt, prov, category=get("category") or "", context=get("context"),
                            target=get("target"), response=get("response")))
    return out


class FileSource(Source):
    name = "file"
    """(registered lazily as ``file`` in repbend.data.sources) A local JSONL or CSV file with the documented fields (see module docstring)."""

    license = "user-provided"
    description = "a local JSONL/CSV file"

    class Config(Section):
        path: str = Field(..., description="The .jsonl or .csv file to read.")
        name: str = Field("file", description="Source name recorded for these rows (e.g. my_refusals).")
        license: str = Field("unknown", description="License of the file, recorded in the manifest.")
        fields: dict[str, str] = Field(default_factory=dict, description="Map of our field names to the file's names.")
        ignore_extra: bool = Field(False, description="Ignore fields other than the documented ones.")

    def load(self) -> list[dict]:
        c = self.config
        p = Path(c.path).expanduser()
        if not p.is_file():
            raise RepbendError(f"Data file {p} does not exist; pass an existing .jsonl or .csv file.")
        prov = {"source": c.name, "package": None, "version": None, "license": c.license, "file": str(p),
                "sha256": sha256_file(p)}
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            records = read_jsonl_rows(p, "User")
        elif suffix == ".csv":
            records = [(i + 2, r) for i, r in enumerate(read_csv(p, [c.fields.get("prompt", "prompt")], "User"))]
        else:
            raise RepbendError(f"Data file {p} must end in .jsonl or .csv (got {suffix or 'no suffix'}).")
        return _rows_from_records(c.name, records, c.fields, c.ignore_extra, prov, str(p))


class HubSource(Source):
    name = "hf"
    """Any ``datasets`` data set by name (users with hub access; ``pip install 'repbend[hub]'``)."""

    license = "see the data set card"
    description = "a Hugging Face hub data set (needs the hub extra)"

    class Config(Section):
        dataset: str = Field(..., description="Data set name on the hub (e.g. walledai/AdvBench) or a local script/folder.")
        subset: str | None = Field(None, description="Configuration (subset) name.")
        split: str = Field("train", description="Split to read.")
        revision: str | None = Field(None, description="Git revision to pin (recorded in the manifest).")
        name: str = Field("hf", description="Source name recorded for these rows.")
        license: str = Field("unknown", description="License of the data set, recorded in the manifest.")
        fields: dict[str, str] = Field(default_factory=dict, description="Map of our field names to the data set's columns.")
        limit: int | None = Field(None, ge=1, description="Read at most this many rows.")

    def load(self) -> list[dict]:
        c = self.config
        try:
            import datasets
        except ImportError:
            raise RepbendError("The hf data source needs the datasets library: pip install 'repbend[hub]'.") from None
        try:
            ds = datasets.load_dataset(c.dataset, c.subset, split=c.split, revision=c.revision)
        except Exception as e:  # network, auth, missing split: all user-fixable
            raise RepbendError(f"Could not load hub data set {c.dataset!r} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); check the name, split and your access.")
        if c.limit:
            ds = ds.select(range(min(c.limit, len(ds))))
        prov = {"source": c.name, "package": f"hub:{c.dataset}", "version": c.revision or "unpinned",
                "license": c.license, "file": f"{c.subset or 'default'}/{c.split}",
                "sha256": getattr(ds, "_fingerprint", None)}
        records = [(i, dict(r)) for i, r in enumerate(ds)]
        return _rows_from_records(c.name, records, c.fields, True, prov, f"hub data set {c.dataset}")
