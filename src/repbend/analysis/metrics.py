"""Per-layer numbers from collected states: linear separability, bending, PCA, logit lens. Maths only.

Separability of harmful vs safe requests, per hidden state, two read-outs fitted on ``fit`` prompts and scored
on ``test`` prompts:

* difference of means: score = state . (mean harmful - mean safe) of the fit states (no fitted weights; the
  direction RepBend's optional direction term pushes along);
* logistic probe: L-BFGS on standardised states, L2 strength picked by 5-fold cross-validation on the fit set.
  (scikit-learn is not a dependency; a 20-line torch fit does the same job.)

Each is reported as AUROC and as the share of harmful test prompts caught by the lowest threshold that flags
at most 5% of the safe test prompts of one kind (the threshold is chosen on the very prompts it is scored on,
so it is optimistic). Bending: per prompt and layer, the distance and cosine between the trained and the
original model's states of the same prompt, averaged per kind.
"""
from __future__ import annotations

import torch
from torch import Tensor

MAX_FPR = 0.05
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def auroc(pos: Tensor, neg: Tensor) -> float:
    """P(score of a random positive > a random negative), ties count half."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def caught_at_fpr(pos: Tensor, neg: Tensor, max_fpr: float = MAX_FPR) -> float:
    """Share of ``pos`` above the lowest threshold that puts at most ``max_fpr`` of ``neg`` above it."""
    allowed = int(max_fpr * len(neg))
    neg_sorted = neg.sort(descending=True).values
    thr = neg_sorted[allowed] if allowed < len(neg) else neg_sorted[-1] - 1
    return float((pos > thr).float().mean())


def fit_logreg(x: Tensor, y: Tensor, l2: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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

    with torch.enable_grad():
        opt.step(closure)
    return mu, sd, w.detach(), b.detach()


def logreg_score(params: tuple[Tensor, Tensor, Tensor, Tensor], x: Tensor) -> Tensor:
    mu, sd, w, b = params
    return ((x - mu) / sd) @ w + b


def choose_l2(x: Tensor, y: Tensor, seed: int = 0, folds: int = 5) -> float:
    """The L2 strength of :data:`L2_GRID` with the best mean cross-validated AUROC on ``(x, y)``."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.randperm(len(y), generator=g) % folds
    best, best_l2 = -1.0, L2_GRID[0]
    for l2 in L2_GRID:
        aucs = []
        for f in range(folds):
            tr, te = fold != f, fold == f
            if not (y[te] == 1).any() or not (y[te] == 0).any():
                continue
            s = logreg_score(fit_logreg(x[tr], y[tr], l2), x[te])
            aucs.append(auroc(s[y[te] == 1], s[y[te] == 0]))
        mean = sum(aucs) / len(aucs) if aucs else 0.0
        if mean > best:
            best, best_l2 = mean, l2
    return best_l2


def _scores(pos: Tensor, negs: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    return {k: {"auroc": auroc(pos, n), "caught_at_5pct": caught_at_fpr(pos, n)} for k, n in negs.items()}


def separability(fit_x: Tensor, fit_y: Tensor, test_pos: Tensor, test_negs: dict[str, Tensor], *,
                 probe: bool = True, seed: int = 0) -> list[dict]:
    """Per layer: difference-of-means and (optionally) logistic-probe scores of harmful vs each safe kind.

    ``fit_x``: (N, layers, H), ``fit_y``: (N,) 1 = harmful; ``test_pos``: (P, layers, H) harmful test states;
    ``test_negs``: {kind: (Q, layers, H)} safe test states. Returns one dict per layer (in the given order):
    ``{"diff_means": {kind: {auroc, caught_at_5pct}}, "probe": {...}, "l2": float}``.
    """
    rows = []
    for j in range(fit_x.shape[1]):
        x = fit_x[:, j]
        d = x[fit_y == 1].mean(0) - x[fit_y == 0].mean(0)
        row: dict = {"diff_means": _scores(test_pos[:, j] @ d, {k: v[:, j] @ d for k, v in test_negs.items()})}
        if probe:
            l2 = choose_l2(x, fit_y, seed)
            m = fit_logreg(x, fit_y, l2)
            row["probe"] = _scores(logreg_score(m, test_pos[:, j]), {k: logreg_score(m, v[:, j]) for k, v in test_negs.items()})
            row["l2"] = l2
        rows.append(row)
    return rows


def bending(original: Tensor, trained: Tensor) -> dict[str, Tensor]:
    """Per layer means over prompts of ``distance`` ||t - o||, ``relative`` ||t - o|| / ||o|| and ``cosine`` (t, o).

    ``original``/``trained``: (N, layers, H) states of the same prompts. Each value is a (layers,) tensor.
    """
    diff = (trained - original).norm(dim=-1)
    return {"distance": diff.mean(0), "relative": (diff / original.norm(dim=-1).clamp_min(1e-12)).mean(0),
            "cosine": torch.nn.functional.cosine_similarity(trained, original, dim=-1).mean(0)}


def pca_2d(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, components (2, H), explained variance ratio (2,))`` of the rows of ``x`` (N, H)."""
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    var = s ** 2
    return mean, vh[:2], var[:2] / var.sum().clamp_min(1e-12)


@torch.no_grad()
def logit_lens(model, tokenizer, states: Tensor, layers: list[int], num_states: int, k: int = 5) -> list[list[list[tuple[str, float]]]]:
    """Top-``k`` (token, probability) decoded from each state: final norm + LM head (the last hidden state is
    already normed and only goes through the head). ``states``: (P, len(layers), H). Returns [prompt][layer][k]."""
    from repbend.analysis.collect import decoder_parts

    _, _, _, norm = decoder_parts(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    p = next(head.parameters())
    out = []
    for i in range(states.shape[0]):
        per_layer = []
        for j, layer in enumerate(layers):
            h = states[i, j].to(device=p.device, dtype=p.dtype)[None]
            if layer != num_states - 1:
                h = norm(h)
            probs = torch.softmax(head(h).float()[0], -1)
            top = probs.topk(k)
            per_layer.append([(tokenizer.decode([int(t)]), float(v)) for v, t in zip(top.values, top.indices)])
        out.append(per_layer)
    return out
