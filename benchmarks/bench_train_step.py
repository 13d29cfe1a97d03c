"""Time one RepBend training step: our engine vs a straightforward formulation of the reference.

Both variants run on the SAME samples and the SAME initial weights (LoRA with seeded non-zero B, so
every loss term is non-trivial), each in its own subprocess so peak memory (ru_maxrss) is per variant:

- engine: repbend.training's step — the splits in dynamically padded batches (``data.passes: auto``: splits of
  similar length share a pass, each padded to its own longest row), no-grad reference passes (adapter
  disabled) + policy passes, only needed hidden states kept, LM-head logits only at retain tokens
  (repbend.training.trainer.Run.loss).
- reference: six separate passes (3 with the adapter disabled, 3 with gradients), every sequence padded
  to a fixed request + response width (512 + 512: request left-padded, response right-padded), full
  (B, T, V) logits for the KL term, the loss written out directly from the paper's definitions.

Checks that the two first-step losses agree (relative difference < 1e-4, fp32) and prints step time,
tokens/s (real, non-padding tokens), peak RSS and the ratios. Memory: the reference formulation at
512 + 512 and batch 2 per split peaks near 20 GB of RAM without gradient checkpointing (full logits
and activations of 6 x 1024-token rows); on a small machine pass --grad-checkpointing (both variants).

With ``--sft`` a third variant times plain supervised fine-tuning (response cross-entropy) of the same
trainable weights on the same rows, one padded batch, and prints the RepBend / SFT step-time ratio.
With ``--bf16`` the engine (and SFT) are timed again under bf16 autocast (``training.precision: bf16``,
what accelerate's ``mixed_precision="bf16"`` does on a CPU): speed-up over fp32 and the first-step loss
difference. On CPUs with AMX the matrix products run several times faster in bf16 (AVX512-BF16 alone: slower than fp32).

    python benchmarks/bench_train_step.py [--data data/built-default] [--batch 2] [--steps 1] [--sft] [--bf16]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def samples(args, tokenizer) -> dict:
    """Encoded rows per split, drawn with a fixed seed from a built dataset (or the project's benign prompts)."""
    import random

    from repbend.data.chat import encode

    rng = random.Random(0)
    if args.data and Path(args.data, "train.jsonl").is_file():
        from repbend.training.data import load_rows

        rows = load_rows(args.data)
        by = {s: [r for r in rows if r["split"] == s] for s in ("safe", "unsafe", "retain")}
    else:  # no built data: benign prompts with generated-length filler answers (timing/agreement only)
        from importlib.resources import files

        prompts = [json.loads(x)["prompt"] for x in files("repbend.data").joinpath("resources/benign.jsonl")
                   .read_text().splitlines() if x.strip()]
        filler = "This is a reasonably long answer sentence used only for benchmarking. "
        by = {s: [{"messages": [{"role": "user", "content": p}], "response": filler * rng.randint(2, 12)}
                  for p in prompts] for s in ("safe", "unsafe", "retain")}
    return {s: [encode(tokenizer, r["messages"], r["response"], max_request_tokens=args.max_request,
                       max_response_tokens=args.max_response) for r in rng.sample(by[s], args.batch)]
            for s in ("safe", "unsafe", "retain")}


def build(args):
    import torch
    from peft import LoraConfig, get_peft_model

    from repbend.methods.repbend import RepBend, RepBendConfig
    from repbend.models import load_model
    from repbend.training.model_setup import linear_block_modules, shape_of

    torch.manual_seed(0)
    model, tok = load_model(args.model, device="cpu", dtype="float32", for_training=True)
    L, H = shape_of(model)
    method = RepBend(RepBendConfig(max_unsafe_ratio=None), L, H)
    cfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=linear_block_modules(model),
                     layers_to_transform=method.trainable_layers(), task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    model.train()
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from repbend.training.trainer import make_optimizer

    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-5, 0.0)   # as the trainer builds it
    return model, tok, method, opt


def engine_step_fn(model, tok, method, passes: str = "auto"):
    from accelerate import Accelerator

    from repbend.training.trainer import Run

    acc = Accelerator(cpu=True)
    run = Run(acc, model, None, model.disable_adapter, method, tok.pad_token_id, False, passes)
    return lambda items: run.loss(items, 0.0)[0]


def sft_step_fn(model, tok):
    """Plain supervised fine-tuning on the same rows (the model's trainable weights as set up here): every split's
    rows in ONE dynamically padded batch, next-token cross-entropy on the response tokens, no reference pass."""
    import torch

    from repbend.training.data import collate_splits

    def step(items):
        b, _ = collate_splits({s: items[s] for s in ("safe", "unsafe", "retain")}, tok.pad_token_id)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits[:, :-1]
        target = b.input_ids[:, 1:]
        mask = b.response_mask[:, 1:].bool()
        return torch.nn.functional.cross_entropy(logits[mask], target[mask])

    return step


def fixed_pad(items, pad_id, req_w, resp_w):
    """Request left-padded to req_w, response right-padded to resp_w: (ids, attention, positions, response mask)."""
    import torch

    n = len(items)
    ids = torch.full((n, req_w + resp_w), pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, e in enumerate(items):
        req, resp = e.input_ids[:e.request_len], e.input_ids[e.request_len:]
        ids[i, req_w - len(req):req_w] = torch.tensor(req)
        ids[i, req_w:req_w + len(resp)] = torch.tensor(resp, dtype=torch.long)
        att[i, req_w - len(req):req_w + len(resp)] = 1
    pos = (att.cumsum(1) - 1).clamp_min(0)
    resp_mask = att.bool().clone()
    resp_mask[:, :req_w] = False
    return ids, att, pos, resp_mask


def reference_step_fn(model, tok, method, req_w, resp_w):
    import torch

    c = method.config

    def run(m, split, items):
        ids, att, pos, _ = fixed_pad(items[split], tok.pad_token_id, req_w, resp_w)
        return m(input_ids=ids, attention_mask=att, position_ids=pos, output_hidden_states=True, use_cache=False)

    def l2(hp, hr, layers, mask):
        return torch.stack([(hp[l] - hr[l]).norm(dim=-1)[mask].mean() for l in layers]).mean()

    def step(items):
        with torch.no_grad(), model.disable_adapter():
            ref = {s: run(model, s, items) for s in ("safe", "unsafe", "retain")}
        pol = {s: run(model, s, items) for s in ("safe", "unsafe", "retain")}
        masks = {s: fixed_pad(items[s], tok.pad_token_id, req_w, resp_w)[3] for s in items}
        att_r = fixed_pad(items["retain"], tok.pad_token_id, req_w, resp_w)[1].bool()
        l_safe = l2(pol["safe"].hidden_states, ref["safe"].hidden_states, method.safe, masks["safe"])
        l_unsafe = l2(pol["unsafe"].hidden_states, ref["unsafe"].hidden_states, method.target, masks["unsafe"])
        cos = []
        for l in method.target:
            x = torch.nn.functional.normalize(pol["unsafe"].hidden_states[l][:, req_w - 1], dim=-1)
            n = x.shape[0]
            cos.append((1 - x @ x.T)[~torch.eye(n, dtype=torch.bool)].mean())
        T = c.kl_temperature
        lp = torch.log_softmax(pol["retain"].logits / T, -1)
        lr = torch.log_softmax(ref["retain"].logits / T, -1)
        kl = (lr.exp() * (lr - lp)).sum(-1)[att_r]
        kl = (kl.sum() / att_r.shape[0] if c.kl_reduction == "batchmean" else kl.mean()) * T * T
        return c.alpha * l_safe - c.beta * l_unsafe + c.gamma * torch.stack(cos).mean() + c.epsilon * kl

    return step


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    model, tok, method, opt = build(args)
    items = samples(args, tok)
    if args.variant.startswith("engine"):
        step = engine_step_fn(model, tok, method)
    elif args.variant.startswith("sft"):
        step = sft_step_fn(model, tok)
    else:
        step = reference_step_fn(model, tok, method, args.max_request, args.max_response)
    losses, times, cpu, gnorms = [], [], [], []
    for i in range(args.steps + 1):  # step 0 = warm-up (its loss is the one compared: same weights in both)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.variant.endswith("_bf16")):
            loss = step(items)
        loss.backward()
        gnorms.append(float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1e9)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(float(loss.detach()))
    tokens = sum(len(e.input_ids) for v in items.values() for e in v)
    print(json.dumps({"variant": args.variant, "losses": losses, "grad_norms": gnorms, "times": times, "cpu": cpu,
                      "tokens": tokens, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="Model spec for repbend.models.load_model.")
    ap.add_argument("--data", default="data/built-default", help="Built dataset (falls back to benign prompts).")
    ap.add_argument("--batch", type=int, default=2, help="Rows per split.")
    ap.add_argument("--steps", type=int, default=1, help="Timed steps after one warm-up step (0: time the warm-up).")
    ap.add_argument("--max-request", type=int, default=512, help="Request width (reference pads to it).")
    ap.add_argument("--max-response", type=int, default=512, help="Response width (reference pads to it).")
    ap.add_argument("--grad-checkpointing", action="store_true", help="Enable gradient checkpointing in both.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per variant (0 = torch's default).")
    ap.add_argument("--variant", choices=["engine", "reference", "sft", "engine_bf16", "sft_bf16"], help=argparse.SUPPRESS)
    ap.add_argument("--sft", action="store_true", help="Also time plain SFT on the same rows (RepBend / SFT ratio).")
    ap.add_argument("--reuse", nargs="*", default=[], metavar="VARIANT=FILE",
                    help="Take a variant's result from FILE (its JSON line) instead of running it again.")
    ap.add_argument("--bf16", action="store_true", help="Also time the engine (and SFT) under bf16 autocast.")
    ap.add_argument("--no-reference", action="store_true", help="Skip the reference formulation (e.g. bf16 on a "
                                                                 "large model only).")
    args = ap.parse_args()
    args.reuse = dict(x.split("=", 1) for x in args.reuse)
    if args.variant:
        return child(args)
    res = {}
    variants = ["engine"] + ([] if args.no_reference else ["reference"]) + (["sft"] if args.sft else [])
    variants += [f"{v}_bf16" for v in ("engine", "sft") if v in variants] if args.bf16 else []
    for variant in variants:
        if args.reuse and variant in args.reuse:  # a variant's JSON line from an earlier run (same args)
            res[variant] = json.loads(Path(args.reuse[variant]).read_text().strip().splitlines()[-1])
            continue
        cmd = [sys.executable, __file__, "--variant", variant] + [a for a in sys.argv[1:] if a != "--bf16"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant}: {json.dumps(res[variant])}", flush=True)
    e, r = res["engine"], res.get("reference", res["engine"])
    first = 0 if min(len(e["times"]), len(r["times"])) == 1 else 1  # steps 0: compare the warm-up steps
    timed = lambda x, k="times": (x[k][0] if first == 0 else sum(x[k][1:]) / (len(x[k]) - 1))  # noqa: E731
    rel = abs(e["losses"][0] - r["losses"][0]) / max(abs(r["losses"][0]), 1e-12)
    grel = abs(e["grad_norms"][0] - r["grad_norms"][0]) / max(abs(r["grad_norms"][0]), 1e-12)
    print(f"samples: {args.batch} per split, {e['tokens']} real tokens/step; reference pads to "
          f"{args.max_request}+{args.max_response}")
    print(f"{'variant':<10} {'step s':>8} {'CPU s':>8} {'tokens/s':>9} {'peak RSS MB':>12} {'loss (step 0)':>16}")
    for name, x in res.items():
        print(f"{name:<10} {timed(x):>8.2f} {timed(x, 'cpu'):>8.2f} {x['tokens'] / timed(x):>9.1f} "
              f"{x['maxrss_mb']:>12.0f} {x['losses'][0]:>16.8f}")
    for v in ("engine", "sft"):
        if f"{v}_bf16" in res:
            b, f32 = res[f"{v}_bf16"], res[v]
            d = abs(b["losses"][0] - f32["losses"][0]) / max(abs(f32["losses"][0]), 1e-12)
            print(f"{v}: bf16 autocast / fp32 speed-up {timed(f32) / timed(b):.2f}x wall, "
                  f"{timed(f32, 'cpu') / timed(b, 'cpu'):.2f}x CPU time; first-step loss relative difference {d:.2e}")
    if "reference" not in res:
        return
    print(f"speed-up (reference / engine step time): {timed(r) / timed(e):.2f}x wall, "
          f"{timed(r, 'cpu') / timed(e, 'cpu'):.2f}x CPU time (robust when the machine is shared)")
    if "sft" in res:
        f = res["sft"]
        print(f"RepBend engine / plain SFT step time: {timed(e) / timed(f):.2f}x wall, "
              f"{timed(e, 'cpu') / timed(f, 'cpu'):.2f}x CPU time (goal: at most 1.5x)")
    print(f"peak memory ratio (engine / reference): {e['maxrss_mb'] / r['maxrss_mb']:.2f}")
    print(f"loss relative difference: {rel:.2e} (must be < 1e-4); grad-norm relative difference: {grel:.2e}")
    if rel >= 1e-4:
        sys.exit("FAIL: the two formulations disagree")


if __name__ == "__main__":
    main()
