"""How well does a model's own representation tell harmful requests from safe ones that look harmful?

A diagnostic for the default-model targets (docs/TUNING.md, "What the original model already
separates"). RepBend changes how a model answers a request by moving the hidden states that request
produces; it can only treat two requests differently where the model already tells them apart (or
where training teaches it to). This script measures that on the ORIGINAL model: a logistic regression
on the hidden state of the last prompt token (where generation starts; every layer 0..L), trained on
the training data's requests (harmful: the `unsafe` rows; safe: the benign and
over-refusal-train rows), tested on requests it never saw:

* harmful: HarmBench validation (60) and test (240) behaviours, as the direct-request attack sends
  them (context prepended for contextual behaviours);
* safe: the over-refusal set's held-out `val` (48) and `eval` (108) parts: XSTest-style prompts with
  alarming words, the prompts on which over-refusal compliance is measured.

Also per layer: the same scores for the plain difference of the training means (harmful - safe; no
fitted weights; docs/TUNING.md, "What the original model already separates").

A baseline with no model states (logistic regression on which tokens a prompt contains) shows how far
words alone go. Printed per layer: AUROC, and the share of harmful behaviours caught at the best threshold that flags at
most 5% of the held-out over-refusal prompts (the targets allow 5 points of over-refusal compliance;
the threshold is picked on the very prompts it is scored on, so it is optimistic). On the test part
the same is given for the behaviours the original model actually complied with under the direct-request
attack (from a finished `eval-original` run, if given): a model that refused exactly the caught ones
and answered the rest as before would cut direct-request ASR by that share, no more.

This is a read-out of the frozen model's features, not a proof: training can build new features (a
LoRA adapter adds capacity), and a non-linear read-out can do better than a linear one. It is a
measured ceiling for "use the distinctions the model already makes", which is what a light adapter
trained for 60 steps mostly does.

    python tools/probe_separability.py -o runs/probe [--eval-original runs/demo-v4/eval-original]

Logistic regression is hand-written (torch, L-BFGS on standardised features, L2 strength chosen by
5-fold cross-validation on the training requests) because scikit-learn is not a dependency.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from repbend.data.chat import prompt_ids
from repbend.data.sources import load_project
from repbend.evaluation.attacks.base import chat_messages
from repbend.evaluation.benchmarks.packaged import HarmBench, HarmBenchVal
from repbend.io import atomic_write_json, read_jsonl
from repbend.models.loading import load_model
from repbend.seeding import seed_everything

MAX_FPR = 0.05
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


@torch.no_grad()
def last_token_states(model, tok, prompts: list[str], desc: str) -> torch.Tensor:
    """(N, L+1, H) hidden states of each prompt's last token (the assistant header: where generation starts)."""
    out = []
    for p in tqdm(prompts, desc=desc, leave=False):
        ids = torch.tensor([prompt_ids(tok, chat_messages(p))])
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        out.append(torch.stack([h[0, -1].float() for h in hs]))
    return torch.stack(out)


def fit_logreg(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardise, then L-BFGS on mean logistic loss + l2 * ||w||^2. Returns (mean, std, w, b)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return mu, sd, w.detach(), b.detach()


def score(model_params, x: torch.Tensor) -> torch.Tensor:
    mu, sd, w, b = model_params
    return ((x - mu) / sd) @ w + b


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a random positive > a random negative), ties count half."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def caught_at_fpr(pos: torch.Tensor, neg: torch.Tensor, max_fpr: float) -> tuple[float, float]:
    """Share of ``pos`` above the lowest threshold that puts at most ``max_fpr`` of ``neg`` above it."""
    allowed = int(max_fpr * len(neg))              # negatives that may be flagged
    neg_sorted = neg.sort(descending=True).values
    thr = neg_sorted[allowed] if allowed < len(neg) else neg_sorted[-1] - 1
    return float((pos > thr).float().mean()), float(thr)


def choose_l2(x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    folds = torch.randperm(len(y), generator=g) % 5
    best, best_l2 = -1.0, L2_GRID[0]
    for l2 in L2_GRID:
        aucs = []
        for f in range(5):
            tr, te = folds != f, folds == f
            m = fit_logreg(x[tr], y[tr], l2)
            s = score(m, x[te])
            aucs.append(auroc(s[y[te] == 1], s[y[te] == 0]))
        if sum(aucs) / 5 > best:
            best, best_l2 = sum(aucs) / 5, l2
    return best_l2


def separation(s: dict[str, torch.Tensor]) -> dict[str, float]:
    """AUROC and share caught (<= MAX_FPR of the over-refusal prompts flagged), validation and test, from probe scores."""
    return {"auroc_val": auroc(s["hb_val"], s["or_val"]), "auroc_test": auroc(s["hb_test"], s["or_eval"]),
            "caught_val": caught_at_fpr(s["hb_val"], s["or_val"], MAX_FPR)[0],
            "caught_test": caught_at_fpr(s["hb_test"], s["or_eval"], MAX_FPR)[0]}


def bag_of_tokens(tok, sets: dict[str, list[str]], seed: int) -> dict:
    """The same probe on which (lower-cased) tokens a prompt contains, no model states: how far words alone go."""
    enc = {k: [set(tok(p.lower(), add_special_tokens=False)["input_ids"]) for p in v] for k, v in sets.items()}
    vocab = {t: i for i, t in enumerate(sorted(set().union(*enc["train_harmful"], *enc["train_safe"])))}

    def feats(rows: list[set]) -> torch.Tensor:
        x = torch.zeros(len(rows), len(vocab))
        for i, r in enumerate(rows):
            x[i, [vocab[t] for t in r if t in vocab]] = 1.0
        return x

    x = feats(enc["train_harmful"] + enc["train_safe"])
    y = torch.cat([torch.ones(len(enc["train_harmful"])), torch.zeros(len(enc["train_safe"]))])
    l2 = choose_l2(x, y, seed)
    m = fit_logreg(x, y, l2)
    s = {k: score(m, feats(v)) for k, v in enc.items() if not k.startswith("train")}
    return {"l2": l2, **separation(s)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", required=True, help="output folder (probe.json, probe.png)")
    ap.add_argument("--data", default="runs/demo-v4/data", help="a `repbend data build` folder (train.jsonl)")
    ap.add_argument("--eval-original", default=None,
                    help="a finished eval of the original model on the test behaviours (completions.jsonl)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replot", action="store_true", help="only redraw probe.png from the folder's probe.json")
    ap.add_argument("--strip-final-punct", action="store_true",
                    help="drop each prompt's final ?/./! first: HarmBench behaviours never end with '?', the "
                         "over-refusal prompts nearly always do (a style shortcut, not harmfulness)")
    a = ap.parse_args(argv)
    if a.replot:
        saved = json.loads((Path(a.out) / "probe.json").read_text())
        _plot(saved["layers"], Path(a.out) / "probe.png", saved["strip_final_punct"], saved["n_complied"])
        return 0
    train_file = Path(a.data) / "train.jsonl"
    if not train_file.exists():
        print(f"error: {train_file} not found; pass --data a `repbend data build` output folder", file=sys.stderr)
        return 2
    seed_everything(a.seed)
    rows = list(read_jsonl(train_file))
    harmful = sorted({r["messages"][-1]["content"] for r in rows if r["split"] == "unsafe"})
    safe = sorted({r["messages"][-1]["content"] for r in rows if r["kind"] in ("benign", "overrefusal")} - set(harmful))
    test_behaviours = HarmBench().load()
    sets = {
        "train_harmful": harmful, "train_safe": safe,
        "hb_val": [b.full_prompt for b in HarmBenchVal().load()],
        "hb_test": [b.full_prompt for b in test_behaviours],
        "or_val": [r["prompt"] for r in load_project("overrefusal", split="val")],
        "or_eval": [r["prompt"] for r in load_project("overrefusal", split="eval")],
    }
    if a.strip_final_punct:
        sets = {k: [p.rstrip().rstrip("?.!").rstrip() for p in v] for k, v in sets.items()}
    model, tok = load_model(a.model, device="cpu", dtype="float32")
    words = bag_of_tokens(tok, sets, a.seed)
    states = {k: last_token_states(model, tok, v, k) for k, v in sets.items()}
    complied = None
    if a.eval_original:
        done = {r["behaviour_id"]: bool(r["harmful"]) for r in read_jsonl(Path(a.eval_original) / "completions.jsonl")
                if r["attack"] == "direct"}
        complied = torch.tensor([done.get(b.id, False) for b in test_behaviours])
    x_tr = torch.cat([states["train_harmful"], states["train_safe"]])
    y = torch.cat([torch.ones(len(harmful)), torch.zeros(len(safe))])
    n_layers = x_tr.shape[1]
    table = []
    for layer in tqdm(range(n_layers), desc="layers"):
        l2 = choose_l2(x_tr[:, layer], y, a.seed)
        m = fit_logreg(x_tr[:, layer], y, l2)
        s = {k: score(m, v[:, layer]) for k, v in states.items() if not k.startswith("train")}
        row = {"layer": layer, "l2": l2, **separation(s)}
        # the difference of the training means alone (no fitted weights)
        d = x_tr[y == 1, layer].mean(0) - x_tr[y == 0, layer].mean(0)
        row["diff_means"] = separation({k: v[:, layer] @ d for k, v in states.items() if not k.startswith("train")})
        if complied is not None and complied.any():
            row["caught_test_complied"] = caught_at_fpr(s["hb_test"][complied], s["or_eval"], MAX_FPR)[0]
        table.append(row)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "probe.json", {"sizes": {k: len(v) for k, v in sets.items()}, "max_fpr": MAX_FPR,
                                           "model": a.model, "data": str(train_file),
                                           "strip_final_punct": a.strip_final_punct,
                                           "n_complied": int(complied.sum()) if complied is not None else 0,
                                           "bag_of_tokens": words, "layers": table})
    print(f"sizes: {({k: len(v) for k, v in sets.items()})}")
    head = "layer  AUROC val  AUROC test  caught@5%FPR val  test" + ("  test(complied)" if complied is not None else "")
    print(head + "  | difference of means: AUROC val  test  caught val  test")
    for r in table:
        extra = f"  {100 * r['caught_test_complied']:14.1f}" if "caught_test_complied" in r else ""
        dm = r["diff_means"]
        print(f"{r['layer']:5d}  {r['auroc_val']:9.3f}  {r['auroc_test']:10.3f}  {100 * r['caught_val']:16.1f}"
              f"  {100 * r['caught_test']:4.1f}{extra}  | {dm['auroc_val']:26.3f}  {dm['auroc_test']:.3f}"
              f"  {100 * dm['caught_val']:10.1f}  {100 * dm['caught_test']:4.1f}")
    print(f"bag of tokens (no model states): AUROC val {words['auroc_val']:.3f} test {words['auroc_test']:.3f}, "
          f"caught@5%FPR val {100 * words['caught_val']:.1f} test {100 * words['caught_test']:.1f}")
    _plot(table, out / "probe.png", a.strip_final_punct, int(complied.sum()) if complied is not None else 0)
    print(f"wrote {out / 'probe.json'} and {out / 'probe.png'}")
    return 0


def _plot(table: list[dict], path: Path, stripped: bool, n_complied: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in table]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(layers, [r["auroc_val"] for r in table], label="logistic probe, validation (HarmBench val vs over-refusal val)")
    a1.plot(layers, [r["auroc_test"] for r in table], label="logistic probe, test (HarmBench test vs over-refusal eval)")
    if "diff_means" in table[0]:
        a1.plot(layers, [r["diff_means"]["auroc_test"] for r in table], "k-.", lw=1,
                label="test, difference of means (no fitted weights)")
        a2.plot(layers, [100 * r["diff_means"]["caught_test"] for r in table], "k-.", lw=1,
                label="test, difference of means")
    a1.set(xlabel="hidden state", ylabel="AUROC", title="harmful vs look-alike safe requests", ylim=(0.5, 1.0))
    a1.legend(fontsize=7)
    a2.plot(layers, [100 * r["caught_val"] for r in table], label="logistic probe, validation")
    a2.plot(layers, [100 * r["caught_test"] for r in table], label="logistic probe, test")
    if "caught_test_complied" in table[0]:
        a2.plot(layers, [100 * r["caught_test_complied"] for r in table], "--", label=f"logistic probe, test, original complied (n={n_complied})")
    a2.axhline(90, color="grey", lw=0.8, ls=":")
    a2.text(0, 91, "90% (the ASR target)", fontsize=7, color="grey")
    a2.set(xlabel="hidden state", ylabel="% harmful caught", ylim=(0, 100),
           title=f"caught with <= {100 * MAX_FPR:.0f}% over-refusal prompts flagged")
    a2.legend(fontsize=7)
    fig.suptitle("Linear read-outs of the original model's last-prompt-token state"
                 + (" (every prompt's final ?/./! stripped)" if stripped else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
