"""RepBend loss: hand-derived numbers, a naive re-computation, padding, gradient direction, bad input.

tests/methods/test_published_transcription.py holds it to an independent transcription of the published code."""
from __future__ import annotations

import math

import pytest
import torch

from repbend.data.chat import Encoded, collate
from repbend.errors import DivergenceError, RepbendError
from repbend.methods import METHODS
from repbend.methods.base import States
from repbend.methods.repbend import RepBend, RepBendConfig, resolve_target_layers

L, H, V = 4, 6, 11


def _batch(shapes, seed=0):
    """shapes: list of (request_len, response_len) -> right-padded SeqBatch."""
    g = torch.Generator().manual_seed(seed)
    items = [Encoded(torch.randint(1, V, (a + b,), generator=g).tolist(), a, b) for a, b in shapes]
    return collate(items, pad_id=0)


def _states(batch, layers, seed, logits=False):
    g = torch.Generator().manual_seed(seed)
    B, T = batch.input_ids.shape
    hidden = {l: torch.randn(B, T, H, generator=g) for l in layers}
    if not logits:
        return States(hidden=hidden)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    return States(hidden=hidden, final=torch.randn(B, T, H, generator=g), head=head)


def _setup(cfg: RepBendConfig, seed=0):
    m = RepBend(cfg, num_layers=L, hidden_size=H)
    batch = {"safe": _batch([(3, 4), (5, 2), (2, 6)], seed), "unsafe": _batch([(4, 3), (2, 5), (3, 3)], seed + 1),
             "retain": _batch([(3, 3), (6, 1)], seed + 2), "pair": _batch([(4, 2), (2, 6), (3, 1)], seed + 3)}
    needs = m.needs()
    pol = {s: _states(batch[s], n.layers, 10 * seed + i, n.logits) for i, (s, n) in enumerate(needs.items()) if n.policy}
    ref = {s: _states(batch[s], n.layers, 100 + 10 * seed + i, n.logits) for i, (s, n) in enumerate(needs.items())
           if n.reference}
    return m, batch, pol, ref


def test_hand_derived_tiny_case():
    cfg = RepBendConfig(alpha=1, beta=0, gamma=1, epsilon=1, target_layers=[1], safe_layers="target",
                        token_mode="request_last")
    m = RepBend(cfg, num_layers=1, hidden_size=2)
    one = collate([Encoded([5], 1, 0)], pad_id=0)
    two = collate([Encoded([5], 1, 0), Encoded([6], 1, 0)], pad_id=0)
    eye = torch.nn.Identity()
    batch = {"safe": one, "unsafe": two, "retain": one}
    pol = {"safe": States(hidden={1: torch.tensor([[[3.0, 4.0]]])}),
           "unsafe": States(hidden={1: torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])}),
           "retain": States(final=torch.tensor([[[2 * math.log(3), 0.0]]]), head=eye)}
    ref = {"safe": States(hidden={1: torch.zeros(1, 1, 2)}),
           "retain": States(final=torch.zeros(1, 1, 2), head=eye)}
    loss, parts = m(batch, pol, ref, 0.0)
    assert parts["loss/safe"] == pytest.approx(5.0)
    assert parts["loss/cos"] == pytest.approx(1.0)
    assert parts["loss/kl"] == pytest.approx(2 * math.log(4 / 3), rel=1e-6)
    assert float(loss) == pytest.approx(5 + 1 + 2 * math.log(4 / 3), rel=1e-6)


def _naive(m: RepBend, batch, pol, ref):
    c = m.config
    def sel(b):
        rows = []
        for i in range(b.size):
            req = [t for t in range(b.input_ids.shape[1]) if b.request_mask[i, t]]
            resp = [t for t in range(b.input_ids.shape[1]) if b.response_mask[i, t]]
            pick = {"response_all": resp, "request_all": req, "request_response": req + resp,
                    "request_last": req[-1:], "response_first_k": resp[:c.k]}[c.token_mode]
            rows += [(i, t) for t in pick]
        return rows
    def dist(split, layers, p, r):
        vals = [torch.dist(p[split].hidden[l][i, t], r[split].hidden[l][i, t]) for l in layers for i, t in sel(batch[split])]
        return sum(vals) / len(vals)
    total = c.alpha * dist("safe", m.safe, pol, ref) - c.beta * dist("unsafe", m.target, pol, ref)
    cos = 0.0
    for l in m.target:
        u = batch["unsafe"]
        xs = [pol["unsafe"].hidden[l][i, u.last_request_index[i]] for i in range(u.size)]
        pairs = [(i, j) for i in range(len(xs)) for j in range(len(xs)) if i != j]
        cos += sum(1 - torch.cosine_similarity(xs[i], xs[j], dim=0) for i, j in pairs) / len(pairs)
    total += c.gamma * cos / len(m.target)
    T, kls = c.kl_temperature, []
    rb = batch["retain"]
    for i in range(rb.size):
        for t in range(rb.input_ids.shape[1]):
            if rb.attention_mask[i, t]:
                lp = pol["retain"].head(pol["retain"].final[i, t]) / T
                lr = ref["retain"].head(ref["retain"].final[i, t]) / T
                pr = torch.softmax(lr, -1)
                kls.append((pr * (torch.log(pr) - torch.log_softmax(lp, -1))).sum())
    total += c.epsilon * T * T * sum(kls) / (len(kls) if c.kl_reduction == "token_mean" else rb.size)
    if c.eta > 0:
        # one window for the batch: from the last request token, as long as the shortest response (<= pair_tokens)
        u, pr = batch["unsafe"], batch["pair"]
        k = min([c.pair_tokens] + [int(u.response_mask[i].sum()) for i in range(u.size)]
                + [int(pr.response_mask[i].sum()) for i in range(pr.size)])
        vals = []
        for l in m.target:
            for i in range(u.size):
                su, sp = int(u.request_mask[i].sum()) - 1, int(pr.request_mask[i].sum()) - 1
                for j in range(k):
                    vals.append(torch.dist(pol["unsafe"].hidden[l][i, su + j], ref["pair"].hidden[l][i, sp + j]))
        total += c.eta * sum(vals) / len(vals)
    return total


@pytest.mark.parametrize("mode", ["response_all", "request_last", "request_all", "request_response",
                                  "response_first_k"])
@pytest.mark.parametrize("safe_layers", ["all", "target"])
@pytest.mark.parametrize("kl_reduction", ["batchmean", "token_mean"])
def test_matches_naive_computation(mode, safe_layers, kl_reduction):
    cfg = RepBendConfig(alpha=0.5, beta=0.3, gamma=0.2, epsilon=0.7, eta=0.4, token_mode=mode, k=2,
                        safe_layers=safe_layers, target_start=2, target_window=2, pair_tokens=3,
                        max_unsafe_ratio=None, kl_reduction=kl_reduction)
    m, batch, pol, ref = _setup(cfg)
    loss, parts = m(batch, pol, ref, 0.5)
    assert set(parts) == {"loss/safe", "loss/unsafe", "loss/cos", "loss/kl", "loss/pair"}
    assert float(loss) == pytest.approx(float(_naive(m, batch, pol, ref)), rel=1e-5, abs=1e-6)


def test_padding_is_ignored():
    cfg = RepBendConfig(eta=0.4, target_layers=[1, 3], max_unsafe_ratio=None, token_mode="request_response")
    m, batch, pol, ref = _setup(cfg)
    loss, _ = m(batch, pol, ref, 0.0)
    for states in (pol, ref):
        for split, st in states.items():
            pad = ~batch[split].attention_mask.bool()
            for h in st.hidden.values():
                h[pad] = 1e6
            if st.final is not None:
                st.final[pad] = -3e3
    loss2, _ = m(batch, pol, ref, 0.0)
    assert torch.isfinite(loss2) and float(loss2) == pytest.approx(float(loss), rel=1e-6)


def test_unsafe_gradient_increases_distance():
    cfg = RepBendConfig(alpha=0, beta=1, gamma=0, epsilon=0, target_layers=[2], max_unsafe_ratio=None)
    m, batch, pol, ref = _setup(cfg)
    h = pol["unsafe"].hidden[2].clone().requires_grad_(True)
    pol["unsafe"].hidden[2] = h
    loss, parts = m(batch, pol, ref, 0.0)
    loss.backward()
    with torch.no_grad():
        pol["unsafe"].hidden[2] = h - 1.0 * h.grad
    _, parts2 = m(batch, pol, ref, 0.0)
    assert parts2["loss/unsafe"] > parts["loss/unsafe"] + 0.05


def test_needs_follow_the_weights():
    needs = RepBend(RepBendConfig(target_layers=[2, 3]), L, H).needs()
    assert needs["safe"].layers == tuple(range(L + 1)) and needs["safe"].reference
    assert needs["unsafe"].layers == (2, 3) and needs["retain"].logits and "pair" not in needs
    only = RepBend(RepBendConfig(alpha=0, beta=1, gamma=0, epsilon=0, target_layers=[1]), L, H).needs()
    assert set(only) == {"unsafe"}
    pair = RepBend(RepBendConfig(eta=1, target_layers=[1]), L, H).needs()["pair"]
    assert pair.reference and not pair.policy
    assert METHODS.get("repbend") is RepBend


def test_target_layers_resolution_and_range():
    assert resolve_target_layers(RepBendConfig(), 32) == list(range(20, 31))
    assert resolve_target_layers(RepBendConfig(), 30) == list(range(19, 29))
    assert resolve_target_layers(RepBendConfig(target_start=1, target_window=3), 4) == [1, 2, 3]
    with pytest.raises(RepbendError, match="method.target_layers"):
        RepBend(RepBendConfig(target_layers=[2, 9]), L, H)
    with pytest.raises(RepbendError, match="target_start"):
        RepBend(RepBendConfig(target_start=3, target_window=5), L, H)
    with pytest.raises(ValueError, match="target_layers"):
        RepBendConfig(target_layers=[1], target_start=1, target_window=1)
    assert RepBend(RepBendConfig(target_layers=[2, 3]), L, H).trainable_layers() == [0, 1, 2, 3]
    assert RepBend(RepBendConfig(target_layers=[1, 2]), L, H).trainable_layers() == [0, 1, 2]


def test_bad_batches_raise():
    m, batch, pol, ref = _setup(RepBendConfig(target_layers=[1]))
    no_unsafe = {k: v for k, v in batch.items() if k != "unsafe"}
    with pytest.raises(RepbendError, match="no 'unsafe' rows"):
        m.check_batch(no_unsafe)
    prompts_only = dict(batch, safe=_batch([(3, 0), (4, 0)]))
    with pytest.raises(RepbendError, match="selects no tokens"):
        m.check_batch(prompts_only)
    with pytest.raises(RepbendError, match="at least 2 unsafe"):
        m.check_batch(dict(batch, unsafe=_batch([(3, 2)])))


def test_divergence_guard():
    cfg = RepBendConfig(alpha=0, gamma=0, epsilon=0, target_layers=[1], max_unsafe_ratio=2.0)
    m, batch, pol, ref = _setup(cfg)
    m(batch, pol, ref, 0.0)  # random states: distance ~ sqrt(2) x norm, under the limit
    pol["unsafe"].hidden[1] = pol["unsafe"].hidden[1] * 50
    with pytest.raises(DivergenceError, match="max_unsafe_ratio"):
        m(batch, pol, ref, 0.0)


def test_unsafe_margin_caps_each_token_distance():
    # one layer, two unsafe tokens: reference (3, 4) (norm 5) and (0, 1) (norm 1); policy moved by 10 and 0.5
    cfg = RepBendConfig(alpha=0, beta=1, gamma=0, epsilon=0, target_layers=[1], token_mode="request_all",
                        unsafe_margin=1.0, max_unsafe_ratio=None)
    m = RepBend(cfg, num_layers=1, hidden_size=2)
    two = collate([Encoded([5, 6], 2, 0)], pad_id=0)
    ref = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])
    pol = (ref + torch.tensor([[[6.0, 8.0], [0.3, 0.4]]])).requires_grad_(True)
    loss, parts = m({"unsafe": two}, {"unsafe": States(hidden={1: pol})}, {"unsafe": States(hidden={1: ref})}, 0.0)
    # token 1: min(10, 1 * 5) = 5; token 2: min(0.5, 1 * 1) = 0.5 -> mean 2.75, entering with a minus sign
    assert parts["loss/unsafe"] == pytest.approx(2.75)
    assert float(loss) == pytest.approx(-2.75)
    loss.backward()
    assert pol.grad[0, 0].abs().sum() == 0          # capped token: no push any more
    assert pol.grad[0, 1].abs().sum() > 0           # below the cap: still pushed away
    uncapped = RepBend(cfg.model_copy(update={"unsafe_margin": None}), num_layers=1, hidden_size=2)
    _, parts = uncapped({"unsafe": two}, {"unsafe": States(hidden={1: pol.detach()})},
                        {"unsafe": States(hidden={1: ref})}, 0.0)
    assert parts["loss/unsafe"] == pytest.approx(5.25)


def test_safe_token_mode_overrides_the_tokens_of_l_safe_only():
    # one layer; safe row: 2 request tokens moved by 5, 1 response token moved by 1
    cfg = RepBendConfig(alpha=1, beta=0, gamma=0, epsilon=0, target_layers=[1], token_mode="request_response",
                        safe_layers="target", max_unsafe_ratio=None)
    safe = collate([Encoded([1, 2, 4], 2, 1)], pad_id=0)
    ref = torch.zeros(1, 3, 2)
    pol = torch.tensor([[[3.0, 4.0], [0.0, 5.0], [1.0, 0.0]]])
    both = RepBend(cfg, num_layers=1, hidden_size=2)
    _, parts = both({"safe": safe}, {"safe": States(hidden={1: pol})}, {"safe": States(hidden={1: ref})}, 0.0)
    assert parts["loss/safe"] == pytest.approx(11 / 3)
    resp = RepBend(cfg.model_copy(update={"safe_token_mode": "response_all"}), num_layers=1, hidden_size=2)
    _, parts = resp({"safe": safe}, {"safe": States(hidden={1: pol})}, {"safe": States(hidden={1: ref})}, 0.0)
    assert parts["loss/safe"] == pytest.approx(1.0)
    # a safe row with no response under safe_token_mode response_all: a clear error naming the field
    no_resp = collate([Encoded([1, 2], 2, 0)], pad_id=0)
    with pytest.raises(RepbendError, match="safe_token_mode"):
        resp.check_batch({"safe": no_resp})


def test_kl_reduction_batchmean_is_the_token_mean_times_tokens_per_row():
    """batchmean = sum over real retain tokens / rows; token_mean = that sum / tokens. The retain rows of _setup
    have 3 + 3 and 6 + 1 real tokens: 13 tokens over 2 rows, so batchmean = 6.5 x token_mean."""
    parts = {}
    for red in ("batchmean", "token_mean"):
        m, batch, pol, ref = _setup(RepBendConfig(alpha=0, beta=0, gamma=0, epsilon=1, target_layers=[1],
                                                  kl_reduction=red))
        assert int(batch["retain"].attention_mask.sum()) == 13 and batch["retain"].size == 2
        parts[red] = m(batch, pol, ref, 0.0)[1]["loss/kl"]
    assert parts["batchmean"] == pytest.approx(6.5 * parts["token_mean"], rel=1e-6)
    assert RepBendConfig().kl_reduction == "batchmean"
    with pytest.raises(ValueError, match="kl_reduction"):
        RepBendConfig(kl_reduction="mean")


def test_pair_window_starts_at_the_last_request_token_and_is_as_long_as_the_shortest_response():
    """Hand case: one layer, H = 2; unsafe row = 2 request + 3 response tokens, its pair = 2 request + 1 response
    token; pair_tokens 20 -> k = min(20, 3, 1) = 1: only position 1 (the last request token) of each row counts.
    Policy (3, 4) there, reference (0, 0) -> L_pair = 5, whatever the other positions hold."""
    cfg = RepBendConfig(alpha=0, beta=0, gamma=0, epsilon=0, eta=1, target_layers=[1])
    m = RepBend(cfg, num_layers=1, hidden_size=2)
    unsafe = collate([Encoded([1, 2, 3, 4, 5], 2, 3)], pad_id=0)
    pair = collate([Encoded([1, 2, 6], 2, 1)], pad_id=0)
    pol = torch.full((1, 5, 2), 100.0)
    pol[0, 1] = torch.tensor([3.0, 4.0])
    ref = torch.full((1, 3, 2), -7.0)
    ref[0, 1] = 0.0
    loss, parts = m({"unsafe": unsafe, "pair": pair}, {"unsafe": States(hidden={1: pol})},
                    {"pair": States(hidden={1: ref})}, 0.0)
    assert parts["loss/pair"] == pytest.approx(5.0) and float(loss) == pytest.approx(5.0)
    with pytest.raises(RepbendError, match="no response tokens"):
        m({"unsafe": unsafe, "pair": collate([Encoded([1, 2], 2, 0)], pad_id=0)}, {"unsafe": States(hidden={1: pol})},
          {"pair": States(hidden={1: ref[:, :2]})}, 0.0)


def test_the_loss_does_not_repeat_the_batch_check():
    """check_batch runs once per step in the trainer; calling the loss does not run it again."""
    m, batch, pol, ref = _setup(RepBendConfig(target_layers=[1]))
    calls = []
    m.check_batch = lambda b: calls.append(1)
    m(batch, pol, ref, 0.0)
    assert calls == []


def test_an_older_versions_resolved_config_loads_with_the_reduction_it_trained_with():
    """A run folder's config.yaml from before the experimental terms were removed lists them (off) and trained the
    per-token KL: it loads as token_mean. One that turned a removed term on is a clear error."""
    old = {"alpha": 2.0, "epsilon": 3.0, "zeta": 0.0, "direction_margin": 0.5, "steer_state": None,
           "steer_fraction": 1.0, "nu": 0.0, "nll_split": "safe", "unsafe_skip_shared_prefix": False}
    cfg = RepBendConfig.model_validate(old)
    assert cfg.kl_reduction == "token_mean" and cfg.alpha == 2.0
    assert RepBendConfig.model_validate({"alpha": 2.0}).kl_reduction == "batchmean"   # a new config: the paper's
    for on in ({"zeta": 1.0}, {"steer_state": 15}, {"nu": 0.2}, {"unsafe_skip_shared_prefix": True}):
        with pytest.raises(ValueError, match=f"{next(iter(on))}: removed from RepBend"):
            RepBendConfig.model_validate({**old, **on})
