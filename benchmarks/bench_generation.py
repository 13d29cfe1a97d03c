"""Generation throughput at the quick suite's settings, engines side by side, against the arithmetic bound.

The workload is what an evaluation with the quick suite generates greedily (``configs/suites/quick.yaml``):
the conversations of its black-box greedy attacks (direct, prefill, templates, obfuscation, system_prompt)
on its HarmBench subset and the over-refusal / benign prompts, answered through the same path as
``repbend eval`` (:class:`repbend.evaluation.target.ModelTarget`: one call per attack, requests sorted by
length, ``batch_size`` per generation call, ``max_new_tokens``). Optionally (``--build N``) also N
requests of the default data build (harmful + benign, 64 / 96 new tokens, batch 16).

Every engine answers the same requests in the SAME process, interleaved per attack (engine A on attack 1,
engine B on attack 1, A on attack 2, ...), so a busy machine slows all of them alike. Printed per engine:
new tokens/s, requests/s, prompt tokens/s, the agreement of its answers with the first engine (identical
texts), and the arithmetic bound:

* FLOPs per token ~ 2 x (parameters less the input embedding) + attention (4 x layers x hidden x context);
* the machine's matmul rate measured here (fp32 ``torch.mm`` at the decode shape, batch x hidden x
  intermediate, and at a large square shape);
* bound = rate / FLOPs per token; ratio = (measured wall time) / (time the run's FLOPs -- prompt AND new
  tokens -- take at the measured large-matmul rate). 1.0 would be the machine's limit.

    python benchmarks/bench_generation.py [--model default] [--engines hf,loop] [--dtypes float32]
           [--batch 16] [--max-new-tokens 48] [--limit 0] [--build 0] [--json out.json]

``--model`` takes an alias, a folder or a ``.gguf`` file (loaded with transformers in fp32).
``--decode-rows 8,16,64`` times one decode step alone at those batch sizes (dynamic vs static KV cache).
``--engines hf@64,hf:pool@64`` compares one call per attack with one call for the whole workload;
``--engines loop:noshare@64,loop@64`` the loop engine without and with the shared prompt prefix pass.
``--dtypes float32,bfloat16`` adds a bf16 copy of the model run with the first engine (agreement vs fp32).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from repbend.machine import matmul_rate


def load(spec: str, dtype: str):
    import torch

    if spec.endswith(".gguf"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        p = Path(spec)
        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=getattr(torch, dtype))
        model.eval()
        return model, tok
    from repbend.models import load_model

    return load_model(spec, device="cpu", dtype=dtype)


class _Recorder:
    """A target that records the conversations an attack asks for (answers are empty strings)."""

    def __init__(self, settings, tokenizer):
        self.settings, self.model, self.tokenizer, self.calls = settings, None, tokenizer, []

    def generate(self, convs, settings=None):
        s = settings or self.settings
        self.calls.append((convs, s))
        return [[""] * s.num_samples for _ in convs]


def _fixed_batches(lengths, batch_size, max_new_tokens):
    return [(s, min(s + batch_size, len(lengths))) for s in range(0, len(lengths), batch_size)]


def _generate(engine: str, fixed: bool, share: bool, *args, **kwargs):
    """``generate`` with ``engine``; ``fixed``: cut the sorted prompts into consecutive ``batch_size`` chunks (the
    batching before :func:`repbend.models.generation.length_batches`); ``share``: its ``share_prefix``."""
    from repbend.models import generation as g

    if not fixed:
        return g.generate(*args, engine=engine, share_prefix=share, **kwargs)
    keep, g.length_batches = g.length_batches, _fixed_batches
    try:
        return g.generate(*args, engine=engine, share_prefix=share, **kwargs)
    finally:
        g.length_batches = keep


def quick_workload(tokenizer, suite_name: str, batch: int, max_new: int, limit: int) -> list[tuple[str, list, object]]:
    """``[(label, conversations, settings)]``: the suite's greedy black-box calls and its over-refusal sets."""
    from repbend.evaluation.attacks import ATTACKS
    from repbend.evaluation.attacks.base import AttackSkipped
    from repbend.evaluation.overrefusal import ATTACK_NAME, load_sets
    from repbend.evaluation.runner import attack_subset, load_benchmarks
    from repbend.evaluation.suites import build, load_suite
    from repbend.evaluation.types import Conversation

    suite = load_suite(suite_name, [f"generation.batch_size={batch}", f"generation.max_new_tokens={max_new}"])
    settings = suite.generation.settings()
    rec = _Recorder(settings, tokenizer)
    work = []
    for bench_label, (bench, behaviours) in load_benchmarks(suite).items():
        for spec in suite.attacks:
            label, attack = build(ATTACKS, spec)
            if getattr(type(attack), "white_box", False) or not hasattr(attack, "conversations"):
                continue
            if attack.settings(settings).do_sample:
                continue   # sampled attacks (best_of_n) are not part of the greedy workload
            bs = attack_subset(behaviours, spec.get("n_behaviours"), suite.seed)
            if type(attack).needs_target:
                from repbend.evaluation.attacks.base import ensure_targets
                bs = ensure_targets(label, bs, bench_label, allow_generic=suite.allow_generic_target,
                                    generic_target=suite.generic_target)
            rec.calls.clear()
            try:
                attack.run(bs, rec, None)
            except AttackSkipped:
                continue
            for convs, s in rec.calls:
                work.append((label, convs[:limit] if limit else convs, s))
    for name, prompts in load_sets(suite.over_refusal).items():
        convs = [Conversation(r["id"], ATTACK_NAME, name, [{"role": "user", "content": r["prompt"]}]) for r in prompts]
        work.append((f"over_refusal/{name}", convs[:limit] if limit else convs, settings))
    return work


def build_workload(n: int) -> list[tuple[str, list, object]]:
    """The first ``n`` harmful and ``n`` benign requests of the default data build, at its settings."""
    from repbend.data.build import collect, user_text
    from repbend.data.build_config import load_build_config
    from repbend.evaluation.types import Conversation, GenSettings
    from repbend.paths import resolve_config

    cfg = load_build_config(str(resolve_config("data-default")), [])
    data = collect(cfg)
    g = cfg.generation
    out = []
    for kind, n_new in (("harmful", g.max_new_tokens_harmful), ("benign", g.max_new_tokens_benign)):
        convs = [Conversation(r["id"], f"build-{kind}", "", [{"role": "user", "content": user_text(r)}])
                 for r in data[kind][:n]]
        out.append((f"build/{kind}", convs, GenSettings(max_new_tokens=n_new)))
    return out


def flops_per_token(model, context: int) -> float:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    emb = model.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters())
    if getattr(cfg, "tie_word_embeddings", False):
        n += emb            # the tied LM head is used once per token as a matmul
    return 2.0 * (n - emb) + 4.0 * cfg.num_hidden_layers * cfg.hidden_size * context


def decode_steps(spec: str, rows: list[int], prompt: int = 60, steps: int = 20) -> None:
    """Milliseconds per decode step (the model's own forward over a DynamicCache and over a StaticCache, greedy,
    random prompt ids) at each batch size, with the new tokens/s they amount to."""
    import torch
    from transformers import DynamicCache, StaticCache

    model, _ = load(spec, "float32")
    model.eval()
    print(f"decode step, {spec}, fp32, {torch.get_num_threads()} threads, {prompt}-token prompts, {steps} steps; "
          f"load avg {os.getloadavg()[0]:.2f}")
    print(f"{'rows':>5s} {'dynamic ms':>10s} {'tok/s':>7s} {'static ms':>10s} {'tok/s':>7s}")
    g = torch.Generator().manual_seed(0)
    for b in rows:
        ids = torch.randint(100, 40000, (b, prompt), generator=g)
        res = []
        for kind in ("dynamic", "static"):
            with torch.inference_mode():
                cache = (DynamicCache(config=model.config) if kind == "dynamic"
                         else StaticCache(config=model.config, max_cache_len=prompt + steps + 1))
                pos = torch.arange(prompt)[None].expand(b, prompt)
                mask = torch.ones_like(ids)
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                            logits_to_keep=1)
                p = pos[:, -1:]
                t0 = time.perf_counter()
                for _ in range(steps):
                    mask = torch.cat([mask, mask.new_ones((b, 1))], -1)
                    p = p + 1
                    out = model(input_ids=out.logits[:, -1].argmax(-1)[:, None], attention_mask=mask, position_ids=p,
                                cache=cache, use_cache=True, logits_to_keep=1)
                res.append((time.perf_counter() - t0) / steps)
        print(f"{b:5d} {res[0] * 1e3:10.1f} {b / res[0]:7.1f} {res[1] * 1e3:10.1f} {b / res[1]:7.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--engines", default="hf,loop", help="generation engines, the first is the agreement reference; "
                                                         "engine@N runs that engine with batch size N, "
                                                         "engine:fixed@N cuts prompts into consecutive N-row "
                                                         "chunks instead of length_batches, engine:pool@N answers "
                                                         "every workload in ONE target call (as an evaluation's "
                                                         "prefetch does) instead of one call per attack, "
                                                         "engine:noshare@N runs every row's whole prompt (no "
                                                         "shared prefix pass); modifiers combine with + "
                                                         "(loop:pool+noshare@64)")
    ap.add_argument("--dtypes", default="float32", help="float32[,bfloat16]: extra dtypes run with the first engine")
    ap.add_argument("--suite", default="quick")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--group", type=int, default=4, help="batches per generator call (ModelTarget group)")
    ap.add_argument("--limit", type=int, default=0, help="at most this many requests per attack (0 = all)")
    ap.add_argument("--only", default="", help="comma-separated workload labels to keep (e.g. direct,templates)")
    ap.add_argument("--build", type=int, default=0, help="also N harmful + N benign data-build requests")
    ap.add_argument("--json", default="")
    ap.add_argument("--decode-rows", default="", help="instead: time one decode step (ms) at these batch sizes, "
                                                      "e.g. 8,16,32,64,128,256 (60-token prompts, 20 steps)")
    args = ap.parse_args()
    if args.decode_rows:
        return decode_steps(args.model, [int(x) for x in args.decode_rows.split(",")])

    import torch

    from repbend.evaluation.store import Store
    from repbend.evaluation.target import ModelTarget

    engines = args.engines.split(",")
    dtypes = args.dtypes.split(",")
    load_avg = os.getloadavg()
    t0 = time.perf_counter()
    models = {dt: load(args.model, dt) for dt in dtypes}
    load_s = time.perf_counter() - t0
    model, tok = models[dtypes[0]]
    work = quick_workload(tok, args.suite, args.batch, args.max_new_tokens, args.limit)
    if args.build:
        work += build_workload(args.build)
    if args.only:
        keep = set(args.only.split(","))
        work = [w for w in work if w[0] in keep or w[0].split("/")[0] in keep]
    variants = [(e, dtypes[0]) for e in engines] + [(engines[0], dt) for dt in dtypes[1:]]
    tmp = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    targets = {}
    for e, dt in variants:
        m, t = models[dt]
        name, _, bs = e.partition("@")       # engine@N: this variant generates N rows per batch
        name, _, how = name.partition(":")   # engine:fixed: consecutive batch_size chunks instead of length_batches
        mods = set(how.split("+")) - {""}
        targets[(e, dt)] = ModelTarget(
            m, t, Store(tmp / f"{e}-{dt}.jsonl"), batch_size=int(bs or args.batch), fingerprint=f"{e}-{dt}",
            progress=False, group=10 ** 6 if "pool" in mods else args.group,
            generate_fn=lambda *a, _e=name, _f="fixed" in mods, _s="noshare" not in mods, **kw:
            _generate(_e, _f, _s, *a, **kw))
    pooled = {v for v in variants if "pool" in v[0].partition("@")[0].partition(":")[2].split("+")}
    if pooled:
        from repbend.evaluation.target import with_settings
        every = [with_settings(c, s) for _, convs, s in work for c in convs]
    for v in pooled:    # one call for all workloads; the per-label calls below are then answered from the store
        targets[v].generate(every)
    answers: dict = {v: [] for v in variants}
    prompt_tokens = 0
    per_label: dict = {}
    from repbend.data.chat import prompt_ids
    for label, convs, s in work:
        prompt_tokens += sum(len(prompt_ids(tok, c.messages, c.prefill)) for c in convs)
        for v in variants:
            before = dict(targets[v].stats)
            texts = [x[0] for x in targets[v].generate(convs, s)]
            answers[v] += texts
            st = targets[v].stats
            per_label.setdefault(label, {})[f"{v[0]}/{v[1]}"] = {
                "requests": len(convs), "seconds": round(st["seconds"] - before["seconds"], 2),
                "new_tokens": st["new_tokens"] - before["new_tokens"],
                "same_as_first": sum(a == b for a, b in zip(texts, answers[variants[0]][-len(convs):]))}
        print(f"{label:24s} n={len(convs):3d} " + "  ".join(
            f"{k} {r['seconds']:6.1f}s {r['new_tokens'] / max(r['seconds'], 1e-9):6.1f} tok/s same {r['same_as_first']}"
            for k, r in per_label[label].items()) + f"  load {os.getloadavg()[0]:.1f}", flush=True)

    n_req = sum(len(c) for _, c, _ in work)
    ctx = prompt_tokens / max(1, n_req) + args.max_new_tokens / 2
    fpt = flops_per_token(model, int(ctx))
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    inter = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    rate_decode = matmul_rate(args.batch, cfg.hidden_size, inter)
    rate_big = matmul_rate(1024, 1024, 1024)
    ref = variants[0]
    rows = []
    for v in variants:
        st = targets[v].stats
        secs, new = st["seconds"], st["new_tokens"]
        flops = fpt * (prompt_tokens + new)
        same = sum(a == b for a, b in zip(answers[v], answers[ref]))
        rows.append({"engine": v[0], "dtype": v[1], "seconds": round(secs, 2), "requests": n_req,
                     "new_tokens": new, "new_tokens_per_s": round(new / secs, 1),
                     "requests_per_s": round(n_req / secs, 3), "prompt_tokens": prompt_tokens,
                     "agreement_with_" + f"{ref[0]}/{ref[1]}": f"{same}/{len(answers[v])}",
                     "bound_ratio": round(secs / (flops / (rate_big * 1e9)), 2)})
    base = rows[0]["seconds"]
    report = {
        "model": args.model, "parameters": sum(p.numel() for p in model.parameters()), "load_s": round(load_s, 1),
        "settings": {"suite": args.suite, "batch": args.batch, "max_new_tokens": args.max_new_tokens,
                     "limit": args.limit, "build": args.build, "greedy": True},
        "machine": {"threads": torch.get_num_threads(), "loadavg_before": [round(x, 2) for x in load_avg],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "matmul_gflops_decode_shape": round(rate_decode, 1), "matmul_gflops_1024": round(rate_big, 1)},
        "flops_per_token": round(fpt / 1e9, 3),
        "bound_new_tokens_per_s_decode_shape": round(rate_decode * 1e9 / fpt, 1),
        "bound_new_tokens_per_s_1024": round(rate_big * 1e9 / fpt, 1),
        "results": rows, "per_label": per_label,
    }
    print(f"\nmodel {args.model}: {report['parameters'] / 1e6:.0f}M parameters, {fpt / 1e9:.3f} GFLOP/token at "
          f"context ~{int(ctx)}; {n_req} requests, {prompt_tokens} prompt tokens; load avg {load_avg[0]:.2f} -> "
          f"{os.getloadavg()[0]:.2f}")
    print(f"matmul fp32: {rate_decode:.1f} GFLOP/s at ({args.batch}x{cfg.hidden_size})@({cfg.hidden_size}x{inter}), "
          f"{rate_big:.1f} GFLOP/s at 1024^3 -> bound {report['bound_new_tokens_per_s_decode_shape']:.0f} / "
          f"{report['bound_new_tokens_per_s_1024']:.0f} new tokens/s (if prompts were free)")
    print(f"{'engine/dtype':18s} {'seconds':>8s} {'new tok/s':>9s} {'req/s':>7s} {'speed-up':>8s} {'agree':>9s} "
          f"{'x bound':>7s}")
    for r in rows:
        agree = next(v for k, v in r.items() if k.startswith("agreement"))
        print(f"{r['engine'] + '/' + r['dtype']:18s} {r['seconds']:8.1f} {r['new_tokens_per_s']:9.1f} "
              f"{r['requests_per_s']:7.2f} {base / r['seconds']:7.2f}x {agree:>9s} {r['bound_ratio']:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
