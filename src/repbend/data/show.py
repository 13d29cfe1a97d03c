"""``repbend data show``: a built dataset's manifest as rich tables plus a few examples per split."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from repbend.data.dataset import SPLITS, load_built


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _check_manifest(folder, m: dict) -> None:
    """The manifest parts the summary prints; a missing one is one error line (a hand-made or foreign manifest)."""
    from repbend.errors import RepbendError

    def has(d, *keys):
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return False
            d = d[k]
        return True

    need = [("counts", p, k) for p in ("train", "val") for k in ("total", "by_split", "by_source")]
    need += [("decontamination", "by_source")]
    missing = next((".".join(keys) for keys in need if not has(m, *keys)), None)
    if missing:
        raise RepbendError(f"{folder}/manifest.json has no {missing} (it was not written by repbend data build, or was "
                           f"edited); rebuild the folder with repbend data build.")


def show(path: str, examples: int = 2, width: int = 160, console: Console | None = None) -> None:
    ds = load_built(path)
    m = ds.manifest
    _check_manifest(ds.path, m)
    con = console or Console()
    con.print(Text(f"{ds.path}  format {m.get('format')}  config {m.get('config_hash')}  seed {m.get('seed')}", style="bold"))
    model = m.get("model", {})
    con.print(Text(f"model: {model.get('spec')} ({model.get('class')}, {model.get('num_parameters', 0) / 1e6:.1f}M params)"))
    con.print(f"generation: {m.get('generation')}")
    con.print(f"requests: {m.get('requests')}")

    counts = Table("part", *SPLITS, "total", title="rows per split")
    for part in ("train", "val"):
        c = m["counts"][part]
        counts.add_row(part, *(str(c["by_split"].get(s, 0)) for s in SPLITS), str(c["total"]))
    con.print(counts)

    by_source = Table("source", *[f"{p}/{s}" for p in ("train", "val") for s in SPLITS], title="rows per source")
    sources = sorted({s for p in ("train", "val") for s in m["counts"][p]["by_source"]})
    for src in sources:
        by_source.add_row(src, *(str(m["counts"][p]["by_source"].get(src, {}).get(s, 0))
                                 for p in ("train", "val") for s in SPLITS))
    con.print(by_source)

    dec = m["decontamination"]
    dt = Table("source", "read", "kept", "dropped (reason: n)",
               title=f"decontamination against {dec.get('evaluation_prompts')} evaluation prompts")
    for src, s in dec["by_source"].items():
        dt.add_row(src, str(s["read"]), str(s["kept"]), ", ".join(f"{k}: {v}" for k, v in s["dropped"].items()) or "-")
    con.print(dt)
    t = m.get("truncated", {})
    con.print(f"truncated: {t.get('request', 0)} requests (> {t.get('max_request_tokens')} tokens), "
              f"{t.get('response', 0)} responses (> {t.get('max_response_tokens')} tokens)")

    inputs = Table("source", "package", "version", "license", "file", "sha256", title="inputs")
    for i in m.get("inputs", []):
        inputs.add_row(i["source"], str(i.get("package")), str(i.get("version")), i.get("license", ""), Text(i["file"]),
                       (i.get("sha256") or "")[:12])
    con.print(inputs)
    con.print(f"timings: {m.get('timings')}")

    if examples:
        ex = Table("split", "kind", "source", "request", "response", title="examples (train)", show_lines=True)
        for split in SPLITS:
            kinds: dict[str, int] = {}
            for r in ds.rows(split):
                if kinds.get(r["kind"], 0) < examples:
                    kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
                    ex.add_row(split, r["kind"], Text(r["source"]), Text(_clip(r["messages"][-1]["content"], width)),
                               Text(_clip(r["response"], width)))
        con.print(ex)
