"""The RepBend loss against an independent transcription of the published code's formulas.

The ``pub_*`` functions below are written from the published code's semantics (docs in /work/shared/PAPER.md and
docs/METHODS.md), in its own data layout, without any of the project's code:

* every row is a request block LEFT-padded to a common width R followed by a response block RIGHT-padded to a
  common width S; the retain rows are whole conversations right-padded to one width;
* the policy and the frozen reference are run separately on each split; states are multiplied by a (layer, row,
  token) mask: ``L_safe = sum ||h^P * m - h^R * m||_2 / sum m`` over (layer, row, token), the same on the unsafe
  rows and target layers for ``L_unsafe`` (all hidden states 0..L for the safe term);
* ``L_cos``: at column R - 1 (the last request token of every row), per target layer, normalised states, the mean
  of ``1 - cos`` over the off-diagonal pairs, averaged over the target layers;
* ``L_KL``: logits multiplied by the attention mask (a padding position's logits are all 0 in both models, so it
  adds KL 0), ``kl_div(log_softmax(z^P / T), softmax(z^R / T), reduction="batchmean") * T^2``: the sum over tokens
  and vocabulary divided by the number of retain ROWS;
* ``L = alpha L_safe - beta L_unsafe + gamma L_cos + epsilon L_KL`` at the paper's alpha 0.5, beta 0.5, gamma 0.1,
  epsilon 0.3, T 2, response tokens, target window 20..30 of 32 scaled to the tiny model's 4 blocks (2..4).

One difference is deliberate and held here: position ids count real tokens only (``cumsum(mask) - 1``). The
published code left-padded requests without position ids, so its states depended on how much padding a row got;
the engine positions every row as if unpadded, and the transcription does the same so that both see one model.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from repbend.data.chat import Encoded, collate
from repbend.methods.base import States
from repbend.methods.repbend import RepBend, RepBendConfig
from repbend.training.data import collate_splits, rows_of
from repbend.training.forward import forward_states, head_fn

ALPHA, BETA, GAMMA, EPS, T = 0.5, 0.5, 0.1, 0.3, 2.0


# ---------------------------------------------------------------- the transcription (published semantics) ----------
def pub_distance(pol: list[torch.Tensor], ref: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """sum over (layer, row, token) of ||(h^P - h^R) * m||_2 / sum of the (layer, row, token) mask."""
    m = mask.float()[None, :, :, None].expand(len(pol), *mask.shape, 1)
    diff = torch.stack(pol) * m - torch.stack(ref) * m
    return torch.norm(diff, dim=-1, p=2, dtype=torch.float).sum() / m.sum()


def pub_cos(pol: list[torch.Tensor], column: int) -> torch.Tensor:
    """mean over layers of mean over i != j of 1 - cos at one column of every row."""
    total = 0.0
    for h in pol:
        x = h[:, column, :]
        x = x / torch.norm(x, dim=-1, keepdim=True, dtype=torch.float)
        sim = x @ x.T
        off = ~torch.eye(x.shape[0], dtype=torch.bool)
        total = total + (1 - sim[off]).mean()
    return total / len(pol)


def pub_kl(pol_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor, temp: float = T) -> torch.Tensor:
    """kl_div(..., reduction='batchmean') over masked logits, times T^2."""
    m = mask.float()[..., None]
    p = F.log_softmax(pol_logits * m / temp, dim=-1)
    q = F.softmax(ref_logits * m / temp, dim=-1)
    return F.kl_div(p, q, reduction="batchmean") * temp ** 2


def pub_layout(rows: list[tuple[list[int], list[int]]], pad: int):
    """Request block left-padded to R, response block right-padded to S: ids, attention mask, response mask, R."""
    R, S = max(len(q) for q, _ in rows), max(len(a) for _, a in rows)
    ids = torch.full((len(rows), R + S), pad)
    att = torch.zeros(len(rows), R + S, dtype=torch.long)
    for i, (q, a) in enumerate(rows):
        ids[i, R - len(q):R], ids[i, R:R + len(a)] = torch.tensor(q), torch.tensor(a)
        att[i, R - len(q):R + len(a)] = 1
    resp = torch.zeros_like(att)
    resp[:, R:] = att[:, R:]
    return ids, att, resp, R


def pub_run(model, ids, att):
    return model(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(1) - 1).clamp(min=0),
                 output_hidden_states=True, use_cache=False)


def pub_loss(policy, reference, data, target: list[int], pad: int) -> torch.Tensor:
    """The published loss on ``data`` = {split: [(request ids, response ids)]} (retain rows: one whole conversation)."""
    layers_all = list(range(policy.config.num_hidden_layers + 1))
    safe_ids, safe_att, safe_resp, _ = pub_layout(data["safe"], pad)
    uns_ids, uns_att, uns_resp, r_uns = pub_layout(data["unsafe"], pad)
    width = max(len(q) + len(a) for q, a in data["retain"])
    ret_ids = torch.full((len(data["retain"]), width), pad)
    ret_att = torch.zeros_like(ret_ids)
    for i, (q, a) in enumerate(data["retain"]):
        ret_ids[i, :len(q) + len(a)], ret_att[i, :len(q) + len(a)] = torch.tensor(q + a), 1
    with torch.no_grad():
        ref_safe, ref_uns = pub_run(reference, safe_ids, safe_att), pub_run(reference, uns_ids, uns_att)
        ref_ret = pub_run(reference, ret_ids, ret_att)
    pol_safe, pol_uns = pub_run(policy, safe_ids, safe_att), pub_run(policy, uns_ids, uns_att)
    pol_ret = pub_run(policy, ret_ids, ret_att)
    l_safe = pub_distance([pol_safe.hidden_states[l] for l in layers_all], [ref_safe.hidden_states[l] for l in layers_all],
                          safe_resp)
    l_uns = pub_distance([pol_uns.hidden_states[l] for l in target], [ref_uns.hidden_states[l] for l in target], uns_resp)
    l_cos = pub_cos([pol_uns.hidden_states[l] for l in target], r_uns - 1)
    l_kl = pub_kl(pol_ret.logits, ref_ret.logits, ret_att)
    return ALPHA * l_safe - BETA * l_uns + GAMMA * l_cos + EPS * l_kl


# ---------------------------------------------------------------- the engine ----------------------------------------
def engine_loss(policy, reference, data, method: RepBend, pad: int) -> torch.Tensor:
    items = {s: [Encoded(q + a, len(q), len(a)) for q, a in rows] for s, rows in data.items()}
    batch, spans = collate_splits(items, pad)
    needs = method.needs()
    with torch.no_grad():
        ref = forward_states(reference, batch, spans, {s: n for s, n in needs.items() if n.reference},
                             head_fn(reference.get_output_embeddings()))
    pol = forward_states(policy, batch, spans, needs, head_fn(policy.get_output_embeddings()))
    splits = {s: rows_of(batch, sl) for s, sl in spans.items()}
    method.check_batch(splits)
    return method(splits, pol, ref, 0.0)[0]


def _data(vocab: int, seed: int = 0):
    """8 safe rows (4 benign + the refusals of the first 4 harmful requests), 8 unsafe, 4 retain; varied lengths."""
    g = torch.Generator().manual_seed(seed)
    toks = lambda n: torch.randint(5, vocab, (n,), generator=g).tolist()  # noqa: E731
    harmful = [toks(3 + i % 4) for i in range(8)]
    unsafe = [(q, toks(2 + (3 * i) % 5)) for i, q in enumerate(harmful)]
    safe = [(toks(2 + i), toks(3 + i)) for i in range(4)] + [(harmful[i], toks(1 + i)) for i in range(4)]
    retain = [(t[:1], t[1:]) for t in (toks(4 + 3 * i) for i in range(4))]
    return {"safe": safe, "unsafe": unsafe, "retain": retain}


def test_engine_equals_the_published_formulas_in_loss_and_gradients(tiny_model, tiny_tokenizer):
    reference = tiny_model.eval().requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    method = RepBend(RepBendConfig(max_unsafe_ratio=None), num_layers=4, hidden_size=32)
    assert method.target == [2, 3, 4] and method.config.kl_reduction == "batchmean"
    assert (method.config.alpha, method.config.beta, method.config.gamma, method.config.epsilon) == (ALPHA, BETA, GAMMA, EPS)
    data, pad = _data(len(tiny_tokenizer)), tiny_tokenizer.pad_token_id
    params = [p for p in policy.parameters() if p.requires_grad]
    ours = engine_loss(policy, reference, data, method, pad)
    theirs = pub_loss(policy, reference, data, method.target, pad)
    assert abs(float(theirs.detach())) > 1e-3
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5)
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the per-token KL (token_mean) is NOT the published reduction: on these rows it is smaller by the mean real
    # retain length, so the losses differ
    token_mean = RepBend(RepBendConfig(max_unsafe_ratio=None, kl_reduction="token_mean"), num_layers=4, hidden_size=32)
    assert float(engine_loss(policy, reference, data, token_mean, pad)) != pytest.approx(float(theirs), rel=1e-3)


# ---------------------------------------------------------------- hand-derived cases, one per term -------------------
def _one_layer(method_cfg: dict) -> RepBend:
    return RepBend(RepBendConfig(target_layers=[1], safe_layers="target", max_unsafe_ratio=None,
                                 **{"alpha": 0, "beta": 0, "gamma": 0, "epsilon": 0, **method_cfg}), 1, 2)


def test_hand_l_safe():
    """One layer, one safe row: request token + 2 response tokens. Policy minus reference at the response tokens:
    (3, 4) -> 5 and (1, 0) -> 1; the request token (moved by (9, 9)) is not a response token. L_safe = (5 + 1) / 2
    = 3; with alpha 0.5 the loss is 1.5."""
    rows = collate([Encoded([7, 8, 9], 1, 2)], pad_id=0)
    pol = torch.tensor([[[9.0, 9.0], [3.0, 4.0], [1.0, 0.0]]])
    ref = torch.zeros(1, 3, 2)
    assert float(pub_distance([pol], [ref], torch.tensor([[0, 1, 1]]))) == pytest.approx(3.0)
    loss, parts = _one_layer({"alpha": 0.5})({"safe": rows}, {"safe": States(hidden={1: pol})},
                                             {"safe": States(hidden={1: ref})}, 0.0)
    assert parts["loss/safe"] == pytest.approx(3.0) and float(loss) == pytest.approx(1.5)


def test_hand_l_unsafe():
    """Two unsafe rows of one request token and one response token (request tokens moved by 0, not counted):
    response distances ||(0, 2)|| = 2 and ||(6, 8)|| = 10 -> L_unsafe = 6; it enters with minus: beta 0.5 -> -3."""
    rows = collate([Encoded([5, 6], 1, 1), Encoded([5, 6], 1, 1)], pad_id=0)
    ref = torch.ones(2, 2, 2)
    pol = ref + torch.tensor([[[0.0, 0.0], [0.0, 2.0]], [[0.0, 0.0], [6.0, 8.0]]])
    assert float(pub_distance([pol], [ref], torch.tensor([[0, 1], [0, 1]]))) == pytest.approx(6.0)
    loss, parts = _one_layer({"beta": 0.5})({"unsafe": rows}, {"unsafe": States(hidden={1: pol})},
                                            {"unsafe": States(hidden={1: ref})}, 0.0)
    assert parts["loss/unsafe"] == pytest.approx(6.0) and float(loss) == pytest.approx(-3.0)


def test_hand_l_cos():
    """Three unsafe rows with last-request states (1, 0), (0, 1), (2, 0): cos(0,1) = 0, cos(0,2) = 1, cos(1,2) = 0.
    Over the 6 ordered pairs, 1 - cos sums to 1 + 0 + 1 + 1 + 0 + 1 = 4 -> L_cos = 4/6 = 2/3; gamma 0.1 -> 1/15."""
    rows = collate([Encoded([5], 1, 0)] * 3, pad_id=0)
    pol = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[2.0, 0.0]]])
    assert float(pub_cos([pol], 0)) == pytest.approx(2 / 3)
    loss, parts = _one_layer({"gamma": 0.1})({"unsafe": rows}, {"unsafe": States(hidden={1: pol})}, {}, 0.0)
    assert parts["loss/cos"] == pytest.approx(2 / 3) and float(loss) == pytest.approx(1 / 15)


def test_hand_l_kl_batchmean():
    """Two retain rows, the first with 2 real tokens, the second with 1 (+ 1 padding position). At every real token
    the reference logits are (0, 0) and the policy's (2 ln 3, 0); at T = 2: p^R = (1/2, 1/2), p^P = (3/4, 1/4),
    KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3), times T^2 = 2 ln(4/3) per token. batchmean: 3 tokens / 2 rows ->
    L_KL = 3 ln(4/3) = 0.8630; the padding position (logits masked to 0 in both) adds 0. token_mean: 2 ln(4/3)."""
    rows = collate([Encoded([5, 6], 1, 1), Encoded([5], 1, 0)], pad_id=0)
    mask = rows.attention_mask
    pol = torch.tensor([2 * math.log(3), 0.0]).expand(2, 2, 2).clone()
    pol[1, 1] = torch.tensor([50.0, -50.0])   # whatever the padding position holds
    ref = torch.zeros(2, 2, 2)
    assert float(pub_kl(pol, ref, mask)) == pytest.approx(3 * math.log(4 / 3), rel=1e-6)
    eye = torch.nn.Identity()
    for red, want in (("batchmean", 3 * math.log(4 / 3)), ("token_mean", 2 * math.log(4 / 3))):
        loss, parts = _one_layer({"epsilon": 0.3, "kl_reduction": red})(
            {"retain": rows}, {"retain": States(final=pol, head=eye)}, {"retain": States(final=ref, head=eye)}, 0.0)
        assert parts["loss/kl"] == pytest.approx(want, rel=1e-6) and float(loss) == pytest.approx(0.3 * want, rel=1e-6)
