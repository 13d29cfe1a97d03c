"""Time one step of the input-embedding attack: our loss vs the straightforward formulation.

Both variants compute the same per-behaviour target cross-entropy and its gradient with respect to the
soft embeddings, on the same behaviours and the same soft tokens, interleaved step by step so a busy
machine slows both alike:

- engine: ``repbend.evaluation.attacks.embedding.target_losses`` — left padding with explicit position
  ids, so every row's target ends at the last position, and the LM head applied only to the last
  ``max target length + 1`` positions (``logits_to_keep``).
- naive: right padding and full (batch, sequence, vocabulary) logits, cross-entropy masked to the
  target tokens (the form the attack had before, and the usual way to write it).

Checks that the two losses agree (max abs difference < 1e-4) and prints seconds per step (forward +
backward), the speed-up, and the gradient agreement.

    python benchmarks/bench_embedding_step.py [--model default] [--behaviours 4] [--steps 5]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--behaviours", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=20, help="soft tokens per behaviour")
    args = ap.parse_args()

    import torch

    from repbend.evaluation.attacks import whitebox_common as wb
    from repbend.evaluation.attacks.embedding import init_soft, target_losses
    from repbend.evaluation.benchmarks import BENCHMARKS
    from repbend.models import load_model

    model, tok = load_model(args.model)
    model.eval().requires_grad_(False)
    cls = BENCHMARKS.get("harmbench")
    behaviours = cls(cls.Config(n=args.behaviours, seed=0, include_contextual=False)).load()
    target = "Sure, here is how to do that"
    slots = [wb.prompt_slots(tok, b.full_prompt, b.target or target) for b in behaviours]
    emb = model.get_input_embeddings()
    soft0 = init_soft(emb, tok, [b.target or target for b in behaviours], args.tokens).float()
    n_tok = sum(len(s.before) + args.tokens + len(s.after) + len(s.target) for s in slots)
    print(f"model {args.model}; {len(slots)} behaviours, {n_tok} real tokens per step "
          f"(target {sum(len(s.target) for s in slots)}), vocabulary {emb.weight.shape[0]}")

    times = {"engine": [], "naive": []}
    grads, losses = {}, {}
    for step in range(args.steps + 1):            # step 0 warms up and is not timed
        for name, fn in (("engine", target_losses), ("naive", naive_losses)):
            soft = soft0.clone().requires_grad_(True)
            t0 = time.perf_counter()
            loss = fn(model, emb, slots, soft)
            g, = torch.autograd.grad(loss.sum(), soft)
            dt = time.perf_counter() - t0
            if step:
                times[name].append(dt)
            grads[name], losses[name] = g, loss.detach()
    diff = float((losses["engine"] - losses["naive"]).abs().max())
    gdiff = float((grads["engine"] - grads["naive"]).abs().max() / grads["naive"].abs().max())
    te, tn = (sum(times[k]) / len(times[k]) for k in ("engine", "naive"))
    print(f"loss agreement: max |engine - naive| = {diff:.2e}; gradient max rel. diff {gdiff:.2e}")
    print(f"naive : {tn:.3f} s/step")
    print(f"engine: {te:.3f} s/step")
    print(f"speed-up (naive / engine): {tn / te:.2f}x  over {args.steps} steps")
    if diff > 1e-4:
        raise SystemExit(f"losses disagree by {diff:.2e}")


if __name__ == "__main__":
    main()
