"""``repbend data build``: real sources -> decontaminated requests -> on-policy answers -> a dataset folder.

Steps (docs/DATA.md):

1. read the harmful, benign, refusal and evaluation sources (provenance of every file recorded);
2. drop training requests that match an evaluation prompt (:mod:`repbend.data.decontam`), then cap
   each source at its ``max_rows`` (seeded sample);
3. the model to be defended answers every training request (greedy by default), batch by batch; each
   finished batch is appended to ``generations.jsonl`` so an interrupted build resumes where it stopped.
   With ``rows_needed`` (set by ``repbend demo`` / ``compare`` from their training configs) only the requests
   whose rows the training runs will draw are answered: every run's draw order is a hash of (training seed,
   split, row id) (:func:`repbend.data.order.draw_order`), known before any answer, so the build walks each
   run's order over the rows every request could give and answers requests (``rows_needed.window`` at a time)
   until the first ``draws x (1 + margin)`` rows of each split are settled. The trainer then draws from this
   ``train.jsonl`` exactly the rows it would draw from a whole-pool build's; validation requests are all
   answered, so ``val.jsonl`` is the whole-pool build's. A larger budget extends the folder (answers are reused;
   the requests left out are counted in the manifest);
4. rows: a harmful request whose answer complies -> UNSAFE ``harmful``; whose answer is a refusal ->
   SAFE ``refusal`` (the model's own words); every harmful request, answered or not, also gets a SAFE
   ``refusal`` row with a project-written refusal (same ``pair_id``). A benign / over-refusal request -> SAFE ``benign`` /
   ``overrefusal`` and RETAIN rows with the model's answer (a benign answer the model refused is kept
   in RETAIN only, never taught as SAFE);
5. texts longer than the token limits are truncated and counted; a seeded ``val_fraction`` of the
   requests (chosen before any answer; all rows of a request together) goes to ``val.jsonl``;
6. ``train.jsonl``, ``val.jsonl``, ``decontam.jsonl``, ``config.yaml``, ``run_info.json`` are written
   atomically and ``manifest.json`` LAST: a folder without a manifest is an unfinished build.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import yaml

from repbend.config import dump_config
from repbend.data.build_config import DataBuildConfig, SourceSpec
from repbend.data.dataset import check_row
from repbend.data.order import copies, copy_id, draw_order
from repbend.data.decontam import decontaminate, summarise
from repbend.errors import RepbendError
from repbend.io import (append_jsonl, atomic_write_json, claim_output, output_lock, package_versions, read_jsonl,
                        sha256_file, sha256_text, user_path, write_jsonl, write_run_info)

FORMAT = "repbend-built-dataset/1"
STATE = ".build.json"
CHECKPOINT = "generations.jsonl"
WINDOW = 4   # batches per generator call
OUR_FILES = ("train.jsonl", "val.jsonl", "decontam.jsonl", CHECKPOINT, "config.yaml", "run_info.json",
             "manifest.json", STATE)


def generate(*args, **kwargs):  # indirection so tests can interrupt a build
    from repbend.models.generation import generate as _generate
    return _generate(*args, **kwargs)


def config_hash(cfg: DataBuildConfig) -> str:
    """Hash of the settings that decide each answer and row; ``rows_needed`` only decides how many requests are
    answered, so a build whose budget grows extends the same folder (answers already written are reused)."""
    dump = cfg.model_dump(mode="json", exclude={"rows_needed"})   # the same text as before the field existed
    return sha256_text(yaml.safe_dump(dump, sort_keys=False))[:16]


def _prepare_out(out: Path, chash: str, overwrite: bool) -> dict | None:
    """Check the folder (while holding its lock); returns the finished manifest when the same build is complete."""
    state = out / STATE
    if claim_output(out, "data", overwrite=overwrite) == "data":
        try:
            old = json.loads(state.read_text()) if state.is_file() else None
        except (ValueError, OSError):
            old = {"config_hash": "unreadable"}
        if old is not None and not isinstance(old, dict):
            old = {"config_hash": "unreadable"}
        same = old is not None and old.get("config_hash") == chash
        if not same and not overwrite:
            what = f"a different build (config hash {old.get('config_hash')})" if old else "other files"
            raise RepbendError(f"Output folder {out} already holds {what}; pass --overwrite to replace it or "
                               f"choose another --output.")
        if overwrite:  # start over: remove what an earlier build wrote (nothing else)
            for name in OUR_FILES:
                (out / name).unlink(missing_ok=True)
        elif (out / "manifest.json").is_file():
            return _finished_manifest(out / "manifest.json")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state, {"format": FORMAT, "config_hash": chash})
    return None


def _finished_manifest(path: Path) -> dict:
    """The manifest of a finished build in the folder, with one error line when it is damaged."""
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(m, dict) and all(isinstance(m.get(k), dict) for k in ("counts", "decontamination", "timings")):
            return m
    except (ValueError, UnicodeDecodeError):
        pass
    raise RepbendError(f"{path} is damaged (not the manifest repbend data build writes); pass --overwrite to build "
                       f"the folder again.")


def _sample(rows: list[dict], spec: SourceSpec, seed: int, salt: str) -> list[dict]:
    if spec.max_rows is None or len(rows) <= spec.max_rows:
        return rows
    order = list(range(len(rows)))
    random.Random(f"{seed}:{salt}").shuffle(order)
    return [rows[i] for i in sorted(order[:spec.max_rows])]


def _read(specs: list[SourceSpec], inputs: dict) -> list[list[dict]]:
    out = []
    for spec in specs:
        rows = spec.build().load()
        for r in rows:
            p = r["provenance"]
            inputs.setdefault((p["source"], p["file"], p["sha256"]), {k: v for k, v in p.items() if k != "original_id"})
        out.append(rows)
    return out


def collect(cfg: DataBuildConfig) -> dict:
    """Read all sources, decontaminate, sample; no model needed."""
    inputs: dict = {}
    harmful_parts = _read(cfg.harmful, inputs)
    benign_parts = _read(cfg.benign, inputs)
    refusals = [r for part in _read(cfg.refusals, inputs) for r in part if (r.get("response") or "").strip()]
    if not refusals:
        raise RepbendError("The refusal sources hold no response texts; give rows with a 'response' (or 'text').")
    evaluation = [r for part in _read(cfg.evaluation, inputs) for r in part]
    train = [r for part in harmful_parts + benign_parts for r in part]
    ids = [r["id"] for r in train]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise RepbendError(f"Training row id {dup!r} appears in two sources; list each source once.")
    kept, dropped = decontaminate(train, evaluation, cfg.decontam)
    keep = {r["id"] for r in kept}
    pick = lambda parts, specs, tag: [  # noqa: E731
        r for i, (part, spec) in enumerate(zip(parts, specs))
        for r in _sample([x for x in part if x["id"] in keep], spec, cfg.seed, f"{tag}{i}")]
    return {"harmful": pick(harmful_parts, cfg.harmful, "h"), "benign": pick(benign_parts, cfg.benign, "b"),
            "refusals": refusals, "evaluation": evaluation, "dropped": dropped,
            "decontam_summary": summarise(train, dropped), "inputs": list(inputs.values())}


def user_text(row: dict) -> str:
    return f"{row['context']}\n\n---\n\n{row['prompt']}" if row.get("context") else row["prompt"]


def _key(text: str, max_new_tokens: int) -> str:
    return sha256_text(json.dumps([text, max_new_tokens]))[:24]


def _read_checkpoint(ckpt: Path) -> list[dict]:
    """Rows of the checkpoint; a half-written last line (killed mid-write) is cut off so appends stay valid."""
    if not ckpt.is_file():
        return []
    raw = ckpt.read_bytes()
    if raw and not raw.endswith(b"\n"):
        with ckpt.open("r+b") as f:
            f.truncate(raw.rfind(b"\n") + 1)
    return read_jsonl(ckpt)


def generate_answers(model, tokenizer, jobs: list[tuple[str, int]], ckpt: Path, cfg: DataBuildConfig,
                     progress: bool = True) -> dict[str, str]:
    """Answers for (text, max_new_tokens) jobs, resuming from and appending to ``ckpt``."""
    from tqdm.auto import tqdm

    done = {r["key"]: r["text"] for r in _read_checkpoint(ckpt)}
    g = cfg.generation
    unique = sorted({(t, n) for t, n in jobs}, key=lambda j: (j[1], -len(j[0]), j[0]))
    chunks = []
    per_call = WINDOW * g.batch_size   # one generator call: a few batches (continuous batching refills across them)
    for n in sorted({n for _, n in unique}):  # fixed chunks (resume regenerates identical chunks)
        group = [j for j in unique if j[1] == n]
        chunks += [group[i:i + per_call] for i in range(0, len(group), per_call)]
    todo = [c for c in chunks if any(_key(t, n) not in done for t, n in c)]
    bar = tqdm(total=len(unique), initial=len(unique) - sum(map(len, todo)), desc="answer requests", unit="req",
               disable=not progress)
    try:
        for chunk in todo:
            start = time.perf_counter()
            texts = generate(model, tokenizer, [[{"role": "user", "content": t}] for t, _ in chunk],
                             max_new_tokens=chunk[0][1], do_sample=g.do_sample, temperature=g.temperature,
                             top_p=g.top_p, seed=cfg.seed, batch_size=g.batch_size, progress=False)
            share = round((time.perf_counter() - start) / len(chunk), 3)  # seconds per request (timings)
            for (t, n), outs in zip(chunk, texts):
                k = _key(t, n)
                if k not in done:
                    append_jsonl(ckpt, {"key": k, "max_new_tokens": n, "prompt": t, "text": outs[0], "seconds": share})
                    done[k] = outs[0]
            bar.update(len(chunk))
    finally:
        bar.close()
    return {_key(t, n): done[_key(t, n)] for t, n in jobs}


def answer_budgeted(model, tokenizer, data: dict, val_ids: set[str], ckpt: Path, cfg: DataBuildConfig,
                    progress: bool = True) -> dict[str, str]:
    """Answers of the validation requests (all, or those giving the first ``val_retain`` val retain rows) and of the
    training requests ``cfg.rows_needed``'s draws take.

    For each run and split, the rows every training request could give are put in that run's draw order; walking
    it, a row that needs an answer its request does not have yet stops the walk, and the next ``window`` such
    requests are answered together. A walk is done when its first ``draws x (1 + margin)`` rows are settled
    (rows that turn out not to exist, e.g. the UNSAFE row of a request the model refused, are skipped as the
    trainer skips them)."""
    import math

    b, g = cfg.rows_needed, cfg.generation
    n_new = {True: g.max_new_tokens_harmful, False: g.max_new_tokens_benign}
    requests = [(r, True) for r in data["harmful"]] + [(r, False) for r in data["benign"]]
    key_of = {r["id"]: _key(user_text(r), n_new[h]) for r, h in requests}   # the answer's key, once per request
    answers: dict[str, str] = {}

    def answer(todo: list[tuple[dict, bool]]) -> None:
        jobs = [(user_text(r), n_new[h]) for r, h in todo]
        answers.update(generate_answers(model, tokenizer, jobs, ckpt, cfg, progress))

    held_out = [(r, h) for r, h in requests if r["id"] in val_ids]
    if b.val_retain is None:
        answer(held_out)
    else:   # the first val_retain retain rows: benign held-out requests in data order, until enough non-empty answers
        benign = [(r, h) for r, h in held_out if not h]
        i = have = 0
        while i < len(benign) and have < b.val_retain:
            todo = benign[i:i + b.val_retain - have]
            answer(todo)
            i += len(todo)
            have += sum(bool(answers[key_of[r["id"]]].strip()) for r, _ in todo)
    # (row id, split, kind, request, harmful, needs an answer) of every row a training request can give
    rows = [(rid, split, kind, r, h, name != "refusal") for r, h in requests if r["id"] not in val_ids
            for name, (rid, split, kind) in row_ids(r, h, data["refusals"], cfg).items()]
    walks = []
    for d in b.draws:
        for split in ("safe", "unsafe", "retain"):
            pool = [(copy_id(c[0], k), c) for c in rows if c[1] == split
                    for k in range(copies(split, c[2], d.repeat_kinds))]
            need = math.ceil(getattr(d, split) * (1 + b.margin))
            if need and pool:
                walks.append((need, [pool[i][1] for i in draw_order([k for k, _ in pool], d.seed, split, 0)]))
    made: dict[str, set[str]] = {}   # request id -> ids of the rows its answer gave

    def exists(row) -> bool:   # called once the row's request is answered, or for a row that needs no answer
        rid, _, _, r, h, needs = row
        if not needs:
            return True
        if r["id"] not in made:
            one = {"harmful": [r] if h else [], "benign": [] if h else [r], "refusals": data["refusals"]}
            made[r["id"]] = {x["id"] for x in make_rows(one, answers, cfg, _stats())}
        return rid in made[r["id"]]

    window = max(b.window, g.batch_size)
    while True:
        todo: dict[str, tuple[dict, bool]] = {}
        for need, order in walks:
            have, pending = 0, {}
            for row in order:
                if have + len(pending) >= need or len(pending) >= window:
                    break
                r, h = row[3], row[4]
                if row[5] and key_of[r["id"]] not in answers:
                    pending[r["id"]] = (r, h)
                elif exists(row):
                    have += 1
            todo.update(pending)
        if not todo:
            return answers
        answer(list(todo.values()))


def _row(rid: str, split: str, kind: str, req: dict, response: str, pair_id: str | None) -> dict:
    return {"id": rid, "split": split, "kind": kind, "messages": [{"role": "user", "content": user_text(req)}],
            "response": response, "source": req["source"], "pair_id": pair_id}


def _stats() -> dict:
    return {k: 0 for k in ("empty_answers", "harmful_refused_by_model", "harmful_complied", "benign_refused_by_model")}


def _refusal_pick(request_id: str, refusals: list[dict], seed: int) -> dict:
    return refusals[int(sha256_text(f"{seed}|{request_id}"), 16) % len(refusals)]


def row_ids(req: dict, harmful: bool, refusals: list[dict], cfg: DataBuildConfig) -> dict[str, tuple[str, str, str]]:
    """``{name: (row id, split, kind)}`` of every row a request can give. A harmful request's ``refusal`` row (a
    project-written refusal, picked by a hash of seed and id) needs no answer; the others exist depending on it."""
    rid = req["id"]
    if harmful:
        pick = _refusal_pick(rid, refusals, cfg.seed)
        out = {"refusal": (f"{rid}#refusal:{pick['id']}", "safe", "refusal")}
        if cfg.keep_model_refusals:
            out["model_refusal"] = (f"{rid}#model_refusal", "safe", "refusal")
        return {**out, "harmful": (f"{rid}#harmful", "unsafe", "harmful")}
    kind = "overrefusal" if req["source"] == "project_overrefusal" else "benign"
    return {"safe": (f"{rid}#safe", "safe", kind), "retain": (f"{rid}#retain", "retain", kind)}


def make_rows(data: dict, answers: dict[str, str], cfg: DataBuildConfig, stats: dict) -> list[dict]:
    """The rows of every request; a request without an answer (left out by a budgeted build) gives only what needs
    none: a harmful request's project-written refusal."""
    from repbend.refusals import is_refusal

    g, rows = cfg.generation, []
    for req in data["harmful"]:
        ids = row_ids(req, True, data["refusals"], cfg)
        rows.append(_row(*ids["refusal"], req, _refusal_pick(req["id"], data["refusals"], cfg.seed)["response"],
                         req["id"]))
        ans = answers.get(_key(user_text(req), g.max_new_tokens_harmful))
        if ans is None:
            continue
        ans = ans.strip()
        if not ans:
            stats["empty_answers"] += 1
        elif is_refusal(ans):
            stats["harmful_refused_by_model"] += 1
            if cfg.keep_model_refusals:
                rows.append(_row(*ids["model_refusal"], req, ans, req["id"]))
        else:
            stats["harmful_complied"] += 1
            rows.append(_row(*ids["harmful"], req, ans, req["id"]))
    for req in data["benign"]:
        ans = answers.get(_key(user_text(req), g.max_new_tokens_benign))
        if ans is None:
            continue
        ans, ids = ans.strip(), row_ids(req, False, data["refusals"], cfg)
        if not ans:
            stats["empty_answers"] += 1
            continue
        if is_refusal(ans):
            stats["benign_refused_by_model"] += 1
        else:
            rows.append(_row(*ids["safe"], req, ans, None))
        rows.append(_row(*ids["retain"], req, ans, None))
    return rows


def truncate(rows: list[dict], tokenizer, cfg: DataBuildConfig) -> dict:
    """Cut requests/responses to the token limits in place; returns the counts."""
    counts = {"request": 0, "response": 0}

    def cut(text: str, limit: int, what: str) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            return text
        counts[what] += 1
        return tokenizer.decode(ids[:limit], skip_special_tokens=True)

    for r in rows:
        for m in r["messages"]:
            m["content"] = cut(m["content"], cfg.max_request_tokens, "request")
        r["response"] = cut(r["response"], cfg.max_response_tokens, "response")
    return counts


def val_requests(data: dict, cfg: DataBuildConfig) -> set[str]:
    """Ids of the requests held out: a seeded ``val_fraction`` of the harmful and of the benign requests, chosen
    before any answer (a budgeted build holds out the same requests as a whole-pool build)."""
    val: set[str] = set()
    for harmful in (True, False):
        keys = sorted(r["id"] for r in data["harmful" if harmful else "benign"])
        random.Random(f"{cfg.seed}:val:{harmful}").shuffle(keys)
        val.update(keys[:round(len(keys) * cfg.val_fraction)])
    return val


def split_val(rows: list[dict], val_ids: set[str]) -> tuple[list[dict], list[dict]]:
    """(train, val) rows: all rows of a held-out request go to val."""
    def request(r):
        return r["pair_id"] or r["id"].rsplit("#", 1)[0]
    return [r for r in rows if request(r) not in val_ids], [r for r in rows if request(r) in val_ids]


def _counts(rows: list[dict]) -> dict:
    out: dict = {"total": len(rows), "by_split": {}, "by_kind": {}, "by_source": {}}
    for r in rows:
        out["by_split"][r["split"]] = out["by_split"].get(r["split"], 0) + 1
        out["by_kind"][r["kind"]] = out["by_kind"].get(r["kind"], 0) + 1
        per = out["by_source"].setdefault(r["source"], {})
        per[r["split"]] = per.get(r["split"], 0) + 1
    return out


def _model_info(spec: str, model) -> dict:
    """Spec, resolved location and checksums of the model that wrote the answers."""
    info: dict = {"spec": spec, "class": type(model).__name__,
                  "num_parameters": sum(p.numel() for p in model.parameters()),
                  "revision": getattr(model.config, "_commit_hash", None)}
    try:
        from repbend.models import resolve_model
        resolved = resolve_model(spec)
        info["resolved"] = {k: v for k, v in vars(resolved).items() if v not in (None, "")}
        folder = Path(resolved.location)
    except Exception as e:  # informative only: never fail a finished build here
        info["resolved_error"] = f"{type(e).__name__}: {e}"
        return info
    if (folder / "repbend-manifest.json").is_file():  # the converted default model records its own checksums
        m = json.loads((folder / "repbend-manifest.json").read_text())
        info["source"] = m.get("source")
        info["files"] = {k: v.get("sha256") for k, v in m.get("files", {}).items()}
    elif folder.is_dir():
        info["files"] = {p.name: sha256_file(p) for p in sorted(folder.iterdir())
                         if p.is_file() and (p.suffix in (".json", ".safetensors") and p.stat().st_size < 2 << 30)}
    return info


def build_dataset(cfg: DataBuildConfig, out_dir: str | Path, overwrite: bool = False, progress: bool = True) -> dict:
    """Build (or resume) the training set in ``out_dir``; returns the manifest.

    The build holds an exclusive lock on ``out_dir`` throughout (a second build there fails at once)."""
    out = user_path(out_dir, "--output")
    with output_lock(out):
        return _build_dataset(cfg, out, overwrite, progress)


def _build_dataset(cfg: DataBuildConfig, out: Path, overwrite: bool, progress: bool) -> dict:
    t0 = time.perf_counter()
    chash = config_hash(cfg)
    finished = _prepare_out(out, chash, overwrite)
    budget = cfg.rows_needed.model_dump() if cfg.rows_needed is not None else None
    if finished is not None and finished.get("rows_needed") == budget:
        return finished
    if finished is not None:  # same build, another budget: extend it from the answers already written
        (out / "manifest.json").unlink()
    timings = {}
    data = collect(cfg)
    timings["sources_and_decontam_s"] = round(time.perf_counter() - t0, 2)
    if not data["harmful"] and not data["benign"]:
        raise RepbendError("No training requests left after decontamination; check the harmful/benign sources.")

    from repbend.models import load_model
    from repbend.seeding import seed_everything
    seed_everything(cfg.seed)
    t = time.perf_counter()
    model, tokenizer = load_model(cfg.model)
    timings["load_model_s"] = round(time.perf_counter() - t, 2)
    g = cfg.generation
    t = time.perf_counter()
    val_ids = val_requests(data, cfg)
    if cfg.rows_needed is not None:
        answers = answer_budgeted(model, tokenizer, data, val_ids, out / CHECKPOINT, cfg, progress)
    else:
        jobs = [(user_text(r), g.max_new_tokens_harmful) for r in data["harmful"]]
        jobs += [(user_text(r), g.max_new_tokens_benign) for r in data["benign"]]
        answers = generate_answers(model, tokenizer, jobs, out / CHECKPOINT, cfg, progress)
    timings["generate_s"] = round(time.perf_counter() - t, 2)  # this run (0 when all answers were cached)
    timings["generate_s_all_sessions"] = round(sum(r.get("seconds", 0) for r in read_jsonl(out / CHECKPOINT)
                                                   if r["key"] in answers), 2)

    unanswered = {k: sum(_key(user_text(r), n) not in answers for r in data[k])
                  for k, n in (("harmful", g.max_new_tokens_harmful), ("benign", g.max_new_tokens_benign))}
    stats = {"harmful_requests": len(data["harmful"]) - unanswered["harmful"],
             "benign_requests": len(data["benign"]) - unanswered["benign"], **_stats(),
             "unanswered_harmful": unanswered["harmful"], "unanswered_benign": unanswered["benign"]}
    rows = make_rows(data, answers, cfg, stats)
    truncated = truncate(rows, tokenizer, cfg)
    for r in rows:
        check_row(r, f"built row {r['id']}")
    train, val = split_val(rows, val_ids)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    write_jsonl(out / "decontam.jsonl", data["dropped"])
    write_run_info(out, cfg, seed=cfg.seed, kind="data", config_hash=chash)
    timings["total_s"] = round(time.perf_counter() - t0, 2)
    manifest = {
        "format": FORMAT, "config_hash": chash, "seed": cfg.seed, "model": _model_info(cfg.model, model),
        "generation": g.model_dump(), "requests": stats, "rows_needed": budget,
        "counts": {"train": _counts(train), "val": _counts(val)},
        "decontamination": {"settings": cfg.decontam.model_dump(), "dropped": len(data["dropped"]),
                            "by_source": data["decontam_summary"],
                            "evaluation_prompts": len(data["evaluation"])},
        "truncated": {**truncated, "max_request_tokens": cfg.max_request_tokens,
                      "max_response_tokens": cfg.max_response_tokens},
        "inputs": data["inputs"],
        "outputs": {name: {"sha256": sha256_file(out / name), "rows": n}
                    for name, n in (("train.jsonl", len(train)), ("val.jsonl", len(val)),
                                    ("decontam.jsonl", len(data["dropped"])), (CHECKPOINT, len(set(answers))))},
        "timings": timings, "versions": package_versions(),
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest

