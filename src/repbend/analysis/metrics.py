"""Per-layer numbers from collected states: linear separability, bending, PCA, logit lens. Maths only.

Separability of harmful vs safe requests, per hidden state, two read-outs fitted on ``fit`` prompts and scored
on ``test`` prompts:

* difference of means: score = state . (mean harmful - mean safe) of the fit states (no fitted weights; the
  direction RepBend's optional direction term pushes along);
* logistic probe: on standardised states, L2 strength picked by 5-fold cross-validation on the fit set; each fit
  is solved exactly by Newton's method in the span of the fitted rows, all folds and strengths at once
  (scikit-learn is not a dependency; its solvers reach the same optimum).

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


def fit_logreg_many(x: Tensor, y: Tensor, mask: Tensor, l2: Tensor, *, max_iter: int = 100,
                    tol: float = 1e-10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Many L2-regularised logistic regressions at once, each solved exactly (damped Newton).

    ``x``: (B, N, H) states, ``y``: (B, N) labels, ``mask``: (B, N) 1 for the rows problem b is fitted on,
    ``l2``: (B,). Problem b: standardise x[b] with its masked rows' mean and std, then minimise the mean
    logistic loss over the masked rows + l2[b] * ||w||^2. The optimum's w is a combination of the fitted rows
    (w = Z^T a), so Newton runs on (a, bias) with N + 1 unknowns instead of H + 1: exact, and fast when there
    are fewer prompts than hidden units. Returns (mean, std, w, bias), shapes (B, H), (B, H), (B, H), (B,).
    """
    dt = torch.float64
    x, y, m, l2 = x.to(dt), y.to(dt), mask.to(dt), l2.to(dt)
    n = m.sum(1, keepdim=True)
    mu = (x * m[..., None]).sum(1) / n
    sd = (((x - mu[:, None]) ** 2 * m[..., None]).sum(1) / (n - 1).clamp_min(1)).sqrt() + 1e-6
    z = (x - mu[:, None]) / sd[:, None] * m[..., None]                    # rows not fitted on: zero
    k = z @ z.transpose(1, 2)                                             # (B, N, N)
    a = torch.zeros_like(y)
    b = torch.zeros(len(y), dtype=dt)
    eye = torch.eye(y.shape[1], dtype=dt)

    def loss(a_, b_):
        f = (k @ a_[..., None])[..., 0] + b_[:, None]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(f, y, reduction="none")
        return (bce * m).sum(1) / n[:, 0] + l2 * (a_ * (k @ a_[..., None])[..., 0]).sum(1)

    cur = loss(a, b)
    for _ in range(max_iter):
        f = (k @ a[..., None])[..., 0] + b[:, None]
        p = torch.sigmoid(f)
        r, w8 = (p - y) * m / n, p * (1 - p) * m / n                     # gradient / curvature per row
        top = torch.cat([w8[..., None] * k + 2 * l2[:, None, None] * eye, w8[..., None]], 2)
        bottom = torch.cat([(w8[:, None, :] @ k), w8.sum(1)[:, None, None]], 2)
        rhs = -torch.cat([r + 2 * l2[:, None] * a, r.sum(1, keepdim=True)], 1)
        step = torch.linalg.solve(torch.cat([top, bottom], 1), rhs)
        da, db = step[:, :-1], step[:, -1]
        t = torch.ones_like(b)
        for _ in range(30):                                               # halve the step where the loss rose
            new = loss(a + t[:, None] * da, b + t * db)
            bad = new > cur + 1e-12
            if not bad.any():
                break
            t = torch.where(bad, t / 2, t)
        a, b = a + t[:, None] * da, b + t * db
        prev, cur = cur, loss(a, b)
        if ((prev - cur).abs() <= tol * cur.abs().clamp_min(1)).all():
            break
    w = (a[..., None] * z).sum(1)
    return mu.float(), sd.float(), w.float(), b.float()


def fit_logreg(x: Tensor, y: Tensor, l2: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Standardise, then the exact minimiser of mean logistic loss + l2 * ||w||^2. Returns (mean, std, w, b)."""
    mu, sd, w, b = fit_logreg_many(x[None], y[None].float(), torch.ones(1, len(y)), torch.tensor([l2]))
    return mu[0], sd[0], w[0], b[0]


def logreg_score(params: tuple[Tensor, Tensor, Tensor, Tensor], x: Tensor) -> Tensor:
    mu, sd, w, b = params
    return ((x - mu) / sd) @ w + b


def choose_l2(x: Tensor, y: Tensor, seed: int = 0, folds: int = 5) -> float:
    """The L2 strength of :data:`L2_GRID` with the best mean cross-validated AUROC on ``(x, y)``."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.randperm(len(y), generator=g) % folds
    problems = [(l2, f) for l2 in L2_GRID for f in range(folds)
                if (y[fold == f] == 1).any() and (y[fold == f] == 0).any()]
    if not problems:
        return L2_GRID[0]
    masks = torch.stack([(fold != f).float() for _, f in problems])
    mu, sd, w, b = fit_logreg_many(x.expand(len(problems), *x.shape), y.float().expand(len(problems), -1), masks,
                                   torch.tensor([l2 for l2, _ in problems]))
    aucs: dict[float, list[float]] = {l2: [] for l2 in L2_GRID}
    for i, (l2, f) in enumerate(problems):
        te = fold == f
        s = logreg_score((mu[i], sd[i], w[i], b[i]), x[te])
        aucs[l2].append(auroc(s[y[te] == 1], s[y[te] == 0]))
    best, best_l2 = -1.0, L2_GRID[0]
    for l2 in L2_GRID:
        mean = sum(aucs[l2]) / len(aucs[l2]) if aucs[l2] else 0.0
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
