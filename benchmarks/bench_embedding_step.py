"""Time the input-embedding attack: our loss vs the full-sequence and the straightforward formulations.

All variants compute the same per-behaviour target cross-entropy and its gradient with respect to the
soft embeddings, on the same behaviours and the same soft tokens, interleaved step by step so a busy
machine slows all alike:

- engine: ``repbend.evaluation.attacks.embedding.target_losses`` with the prompts' beginnings (chat header
  and request, everything before the soft tokens) run once as a KV cache (``Prefix``, built outside the
  timed step, as the attack builds it once per batch); each step runs ``[soft, after, target]`` only,
  left-padded so every row's target ends the sequence, and the LM head only on the last
  ``max target length + 1`` positions (``logits_to_keep``).
- full: the same left padding and LM-head restriction over the whole sequence ``[before, soft, after,
  target]`` every step (the engine before the prefix cache).
- naive: right padding and full (batch, sequence, vocabulary) logits, cross-entropy masked to the
  target tokens (the usual way to write it).

Checks that the losses agree (max abs difference < 1e-4) and prints seconds per step (forward +
backward), the speed-ups and the gradient agreement. ``--attack N`` also runs the whole optimisation
(``optimise``, the suite's ``cpu`` preset, batches of 4) on N behaviours with the engine and with the
full-sequence loss, interleaved per batch, and compares seconds, steps, best losses and the greedy answers.

    python benchmarks/bench_embedding_step.py [--model default] [--behaviours 4] [--steps 5] [--attack 12]
"""
from __future__ import annotations

import argparse
import time


def naive_losses(model, emb, slots, soft):
    import torch
    import torch.nn.functional as F

    k = soft.shape[1]
    rows, labels = [], []
    for s, vecs in zip(slots, soft):
        ids = torch.tensor(s.before), torch.tensor(s.after + s.target)
        rows.append(torch.cat([emb(ids[0]), vecs, emb(ids[1])]))
        lab = torch.full((len(rows[-1]),), -100, dtype=torch.long)
        lab[len(s.before) + k + len(s.after):] = torch.tensor(s.target)
        labels.append(lab)
    width = max(len(r) for r in rows)
    mask = torch.stack([torch.cat([torch.ones(len(r), dtype=torch.long), torch.zeros(width - len(r), dtype=torch.long)])
                        for r in rows])
    embeds = torch.stack([F.pad(r, (0, 0, 0, width - len(r))) for r in rows])
    lab = torch.stack([F.pad(x, (0, width - len(x)), value=-100) for x in labels])[:, 1:]
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1].float()
    ce = F.cross_entropy(logits.transpose(1, 2), lab, ignore_index=-100, reduction="none")
    return ce.sum(1) / (lab != -100).sum(1).clamp(min=1)


def full_sequence_losses(model, emb, slots, soft, prefix=None, rows=None):
    """Left padding and the LM head on the target positions only, over the whole sequence every step."""
    import torch
    import torch.nn.functional as F

    k, rows_, labels = soft.shape[1], [], []
    for s, vecs in zip(slots, soft):
        rows_.append(torch.cat([emb(torch.tensor(s.before)), vecs, emb(torch.tensor(s.after + s.target))]))
        lab = torch.full((len(rows_[-1]),), -100, dtype=torch.long)
        lab[len(s.before) + k + len(s.after):] = torch.tensor(s.target)
        labels.append(lab)
    width = max(len(r) for r in rows_)
    mask = torch.zeros(len(rows_), width, dtype=torch.long)
    for i, r in enumerate(rows_):
        mask[i, width - len(r):] = 1
    embeds = torch.stack([F.pad(r, (0, 0, width - len(r), 0)) for r in rows_])
    lab = torch.stack([F.pad(x, (width - len(x), 0), value=-100) for x in labels])
    keep = max(len(s.target) for s in slots) + 1
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   logits_to_keep=keep).logits.float()[:, -keep:][:, :-1]
    lab = lab[:, -keep + 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), lab, ignore_index=-100, reduction="none")
    return ce.sum(1) / (lab != -100).sum(1).clamp(min=1)


def whole_attack(model, tok, behaviours, target, n_batches_of=4) -> None:
    """The cpu preset's optimisation with the engine and with the full-sequence loss, interleaved per batch."""
    import repbend.evaluation.attacks.embedding as E
    from repbend.evaluation.attacks import whitebox_common as wb

    cfg = E.EmbeddingConfig(preset="cpu").resolved()
    engine_loss = E.target_losses
    out = {"engine": [0.0, 0, [], []], "full": [0.0, 0, [], []]}
    for start in range(0, len(behaviours), n_batches_of):
        batch = behaviours[start:start + n_batches_of]
        slots = [wb.prompt_slots(tok, b.full_prompt, b.target or target) for b in batch]
        pair = (("engine", engine_loss), ("full", full_sequence_losses))
        for name, fn in pair if start // n_batches_of % 2 == 0 else pair[::-1]:   # alternate which goes first
            E.target_losses = fn
            try:
                t0 = time.perf_counter()
                soft, best, hist = E.optimise(model, tok, slots, [b.target or target for b in batch], cfg, wb.Cost())
                dt = time.perf_counter() - t0
            finally:
                E.target_losses = engine_loss
            texts = E.generate_from_embeddings(model, tok, slots, soft, max_new_tokens=48, samples=1,
                                               do_sample=False, temperature=1.0, top_p=1.0, seed=0)
            o = out[name]
            o[0] += dt
            o[1] += sum(len(h) for h in hist)
            o[2] += [float(x) for x in best]
            o[3] += [t[0] for t in texts]
    (te, se, be, ae), (tf, sf, bf, af) = out["engine"], out["full"]
    same = sum(a == b for a, b in zip(ae, af))
    print(f"attack, {len(behaviours)} behaviours: full {tf:.1f} s ({sf} loss evaluations), engine {te:.1f} s "
          f"({se}); speed-up {tf / te:.2f}x; best losses max |diff| {max(abs(a - b) for a, b in zip(be, bf)):.2e}; "
          f"identical answers {same}/{len(ae)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--behaviours", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=20, help="soft tokens per behaviour")
    ap.add_argument("--attack", type=int, default=0, help="also run the whole cpu-preset optimisation on N behaviours")
    args = ap.parse_args()

    import torch

    from repbend.evaluation.attacks import whitebox_common as wb
    from repbend.evaluation.attacks.embedding import Prefix, init_soft, target_losses
    from repbend.evaluation.benchmarks import BENCHMARKS
    from repbend.models import load_model

    model, tok = load_model(args.model)
    model.eval().requires_grad_(False)
    cls = BENCHMARKS.get("harmbench")
    everything = cls(cls.Config(n=max(args.behaviours, args.attack), seed=0, include_contextual=False)).load()
    behaviours = everything[:args.behaviours]
    target = "Sure, here is how to do that"
    slots = [wb.prompt_slots(tok, b.full_prompt, b.target or target) for b in behaviours]
    emb = model.get_input_embeddings()
    soft0 = init_soft(emb, tok, [b.target or target for b in behaviours], args.tokens).float()
    n_tok = sum(len(s.before) + args.tokens + len(s.after) + len(s.target) for s in slots)
    print(f"model {args.model}; {len(slots)} behaviours, {n_tok} real tokens per step "
          f"(target {sum(len(s.target) for s in slots)}), vocabulary {emb.weight.shape[0]}")

    prefix = Prefix(model, slots)
    variants = (("engine", lambda *a: target_losses(*a, prefix, list(range(len(slots))))),
                ("full", full_sequence_losses), ("naive", naive_losses))
    times = {name: [] for name, _ in variants}
    grads, losses = {}, {}
    for step in range(args.steps + 1):            # step 0 warms up and is not timed
        for name, fn in variants:
            soft = soft0.clone().requires_grad_(True)
            t0 = time.perf_counter()
            loss = fn(model, emb, slots, soft)
            g, = torch.autograd.grad(loss.sum(), soft)
            dt = time.perf_counter() - t0
            if step:
                times[name].append(dt)
            grads[name], losses[name] = g, loss.detach()
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    worst = 0.0
    for other in ("full", "naive"):
        diff = float((losses["engine"] - losses[other]).abs().max())
        gdiff = float((grads["engine"] - grads[other]).abs().max() / grads[other].abs().max())
        worst = max(worst, diff)
        print(f"loss agreement: max |engine - {other}| = {diff:.2e}; gradient max rel. diff {gdiff:.2e}")
    for k, v in mean.items():
        print(f"{k:6s}: {v:.3f} s/step")
    print(f"speed-up over {args.steps} steps: full / engine {mean['full'] / mean['engine']:.2f}x, "
          f"naive / engine {mean['naive'] / mean['engine']:.2f}x")
    if worst > 1e-4:
        raise SystemExit(f"losses disagree by {worst:.2e}")
    if args.attack:
        whole_attack(model, tok, everything[:args.attack], target)


if __name__ == "__main__":
    main()
