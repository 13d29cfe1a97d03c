"""RepBend loss: hand-derived numbers, a naive re-computation, padding, gradient direction, bad input."""
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
    total += c.epsilon * T * T * sum(kls) / len(kls)
    if c.eta > 0:
        vals = []
        for l in m.target:
            for i in range(batch["unsafe"].size):
                ru = [t for t in range(batch["unsafe"].input_ids.shape[1]) if batch["unsafe"].response_mask[i, t]]
                rp = [t for t in range(batch["pair"].input_ids.shape[1]) if batch["pair"].response_mask[i, t]]
                for j in range(min(len(ru), len(rp), c.pair_tokens)):
                    vals.append(torch.dist(pol["unsafe"].hidden[l][i, ru[j]], ref["pair"].hidden[l][i, rp[j]]))
        total += c.eta * sum(vals) / len(vals)
    return total


@pytest.mark.parametrize("mode", ["response_all", "request_last", "request_all", "request_response",
                                  "response_first_k"])
@pytest.mark.parametrize("safe_layers", ["all", "target"])
def test_matches_naive_computation(mode, safe_layers):
    cfg = RepBendConfig(alpha=0.5, beta=0.3, gamma=0.2, epsilon=0.7, eta=0.4, token_mode=mode, k=2,
                        safe_layers=safe_layers, target_start=2, target_window=2, pair_tokens=3,
                        max_unsafe_ratio=None)
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


def test_shared_prefix_mask_marks_tokens_a_safe_row_shares():
    from repbend.methods.repbend import shared_prefix_mask

    # template prefix [1, 2] is shared with every safe row; the second unsafe row also shares [1, 2, 7]
    unsafe = collate([Encoded([1, 2, 5, 6], 3, 1), Encoded([1, 2, 7, 8, 9], 4, 1)], pad_id=0)
    safe = collate([Encoded([1, 2, 7, 3], 3, 1), Encoded([9, 2, 5], 2, 1)], pad_id=0)
    got = shared_prefix_mask(unsafe, [safe])
    assert got.tolist() == [[True, True, False, False, False], [True, True, True, False, False]]
    # padding never matches: a safe row that is a padded prefix of nothing shares nothing beyond its tokens
    short = collate([Encoded([1], 1, 0)], pad_id=0)
    assert shared_prefix_mask(unsafe, [short]).sum(dim=1).tolist() == [1, 1]


def test_skip_shared_prefix_leaves_shared_tokens_out_of_l_unsafe():
    # one layer; unsafe row [1, 2, 5] shares [1, 2] with the safe row: only token 3's distance counts
    cfg = RepBendConfig(alpha=0, beta=1, gamma=0, epsilon=0, target_layers=[1], token_mode="request_all",
                        unsafe_skip_shared_prefix=True, max_unsafe_ratio=None)
    m = RepBend(cfg, num_layers=1, hidden_size=2)
    unsafe = collate([Encoded([1, 2, 5], 3, 0)], pad_id=0)
    safe = collate([Encoded([1, 2, 4], 2, 1)], pad_id=0)
    ref = torch.zeros(1, 3, 2)
    pol = torch.tensor([[[3.0, 4.0], [6.0, 8.0], [0.0, 1.0]]], requires_grad=True)
    _, parts = m({"unsafe": unsafe, "safe": safe}, {"unsafe": States(hidden={1: pol})},
                 {"unsafe": States(hidden={1: ref})}, 0.0)
    assert parts["loss/unsafe"] == pytest.approx(1.0) and parts["unsafe_tokens"] == 1
    # every token shared (a refusal row with the same request): fall back to all tokens, never an empty mean
    same = collate([Encoded([1, 2, 5], 3, 0)], pad_id=0)
    _, parts = m({"unsafe": unsafe, "safe": same}, {"unsafe": States(hidden={1: pol})},
                 {"unsafe": States(hidden={1: ref})}, 0.0)
    assert parts["loss/unsafe"] == pytest.approx((5 + 10 + 1) / 3)


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


def _fake_reference_states(rows_by_key):
    """reference_states(split, kinds, need) over hand-made rows: {(split, kind): [state vector at the last
    request token, ...]}; each row is one request token, so its last request state is that vector."""
    calls = []

    def states(split, kinds, need, request_only=False):
        assert request_only   # the last request state needs no response tokens
        calls.append((split, None if kinds is None else tuple(kinds)))
        vecs = [v for (s, k), vs in rows_by_key.items() if s == split and (kinds is None or k in kinds) for v in vs]
        for i in range(0, len(vecs), 2):
            chunk = vecs[i:i + 2]
            batch = collate([Encoded([5], 1, 0) for _ in chunk], pad_id=0)
            yield batch, States(hidden={l: torch.tensor(chunk, dtype=torch.float32)[:, None, :] for l in need.layers})

    return states, calls


def test_direction_is_the_normalised_difference_of_harmful_and_safe_means_without_refusal_rows():
    cfg = RepBendConfig(alpha=0, beta=0, gamma=0, epsilon=0, zeta=1, target_layers=[1], direction_margin=None)
    m = RepBend(cfg, num_layers=1, hidden_size=2)
    states, calls = _fake_reference_states({
        ("unsafe", "harmful"): [[4.0, 1.0], [2.0, 3.0]],                       # mean (3, 2)
        ("safe", "benign"): [[0.0, 2.0]], ("safe", "overrefusal"): [[0.0, 0.0]],  # mean (0, 1)
        ("safe", "refusal"): [[100.0, -100.0]]})                                 # harmful request: left out
    m.prepare(states)
    assert calls == [("safe", ("benign", "overrefusal")), ("unsafe", None)]
    # (3, 2) - (0, 1) = (3, 1) -> (3, 1) / sqrt(10)
    assert torch.allclose(m.directions[1], torch.tensor([3.0, 1.0]) / math.sqrt(10))
    # L_dir on one unsafe row moved by (1, 1) from its reference: (1, 1) . d = 4 / sqrt(10); the loss is -zeta * that
    one = collate([Encoded([5], 1, 0)], pad_id=0)
    pol = {"unsafe": States(hidden={1: torch.tensor([[[2.0, 1.0]]])})}
    ref = {"unsafe": States(hidden={1: torch.tensor([[[1.0, 0.0]]])})}
    loss, parts = m({"unsafe": one}, pol, ref, 0.0)
    assert parts["loss/dir"] == pytest.approx(4 / math.sqrt(10))
    assert float(loss) == pytest.approx(-4 / math.sqrt(10))


def test_direction_rows_and_margin_cap():
    cfg = RepBendConfig(alpha=0, beta=0, gamma=0, epsilon=0, zeta=2, target_layers=[1], direction_rows=2,
                        direction_margin=0.5)
    m = RepBend(cfg, num_layers=1, hidden_size=2)
    # only the first 2 rows per side count: unsafe mean (1, 0), safe mean (-1, 0) -> d = (1, 0)
    states, _ = _fake_reference_states({("unsafe", "harmful"): [[1.0, 1.0], [1.0, -1.0], [50.0, 50.0]],
                                        ("safe", "benign"): [[-1.0, 0.0], [-1.0, 0.0], [0.0, 99.0]]})
    m.prepare(states)
    assert torch.allclose(m.directions[1], torch.tensor([1.0, 0.0]))
    two = collate([Encoded([5], 1, 0), Encoded([6], 1, 0)], pad_id=0)
    # row 0: pushed by 10 along d, capped at 0.5 * ||ref|| = 0.5 * 2 = 1; row 1: moved AGAINST d by 3 -> -3 (no floor)
    ref = {"unsafe": States(hidden={1: torch.tensor([[[2.0, 0.0]], [[0.0, 4.0]]])})}
    pol = {"unsafe": States(hidden={1: torch.tensor([[[12.0, 0.0]], [[-3.0, 4.0]]])})}
    loss, parts = m({"unsafe": two}, pol, ref, 0.0)
    assert parts["loss/dir"] == pytest.approx((1.0 - 3.0) / 2)
    assert float(loss) == pytest.approx(-2 * (1.0 - 3.0) / 2)


def test_direction_gradient_moves_unsafe_states_along_it():
    cfg = RepBendConfig(alpha=0, beta=0, gamma=0, epsilon=0, zeta=1, target_layers=[1], direction_margin=None)
    m = RepBend(cfg, num_layers=1, hidden_size=2)
    states, _ = _fake_reference_states({("unsafe", "harmful"): [[0.0, 1.0]], ("safe", "benign"): [[0.0, -1.0]]})
    m.prepare(states)
    one = collate([Encoded([5], 1, 0)], pad_id=0)
    h = torch.tensor([[[1.0, 1.0]]], requires_grad=True)
    loss, _ = m({"unsafe": one}, {"unsafe": States(hidden={1: h})}, {"unsafe": States(hidden={1: h.detach().clone()})}, 0)
    loss.backward()
    assert torch.allclose(h.grad[0, 0], torch.tensor([0.0, -1.0]))   # descent moves h by +d = (0, 1)


def test_direction_bad_input_is_a_clear_error():
    cfg = RepBendConfig(alpha=0, beta=0, gamma=0, epsilon=0, zeta=1, target_layers=[1], direction_safe_kinds=["nope"])
    m = RepBend(cfg, num_layers=1, hidden_size=2)
    assert set(m.needs()) == {"unsafe"} and m.needs()["unsafe"].reference
    one = collate([Encoded([5], 1, 0)], pad_id=0)
    st = {"unsafe": States(hidden={1: torch.zeros(1, 1, 2)})}
    with pytest.raises(RepbendError, match="call prepare"):
        m({"unsafe": one}, st, st, 0.0)
    states, _ = _fake_reference_states({("unsafe", "harmful"): [[0.0, 1.0]], ("safe", "benign"): [[0.0, -1.0]]})
    with pytest.raises(RepbendError, match="direction_safe_kinds"):
        m.prepare(states)
    same, _ = _fake_reference_states({("unsafe", "harmful"): [[1.0, 1.0]], ("safe", "benign"): [[1.0, 1.0]]})
    with pytest.raises(RepbendError, match="identical"):
        RepBend(cfg.model_copy(update={"direction_safe_kinds": ["benign"]}), 1, 2).prepare(same)
    # zeta 0: prepare does not even ask for states
    RepBend(RepBendConfig(target_layers=[1]), 1, 2).prepare(lambda *a: (_ for _ in ()).throw(AssertionError("called")))


def test_steer_state_shift_is_minus_c_times_the_mean_difference_and_enters_the_unsafe_need():
    cfg = RepBendConfig(alpha=0, beta=1, gamma=0, epsilon=0, target_layers=[2], steer_state=1, steer_coefficient=2.0,
                        token_mode="request_last")
    m = RepBend(cfg, num_layers=3, hidden_size=2)
    assert m.needs()["unsafe"].shift is None                      # before prepare: nothing to add yet
    states, calls = _fake_reference_states({("unsafe", "harmful"): [[4.0, 1.0], [2.0, 3.0]],   # mean (3, 2)
                                            ("safe", "benign"): [[0.0, 2.0]], ("safe", "overrefusal"): [[0.0, 0.0]],
                                            ("safe", "refusal"): [[100.0, -100.0]]})
    m.prepare(states)
    torch.testing.assert_close(m.steer_shift, -2.0 * torch.tensor([3.0, 1.0]))
    need = m.needs()["unsafe"]
    assert set(need.shift) == {1} and need.reference and m.directions is None   # zeta 0: no L_dir directions
    assert need.shift_fraction == 1.0
    assert RepBend(cfg.model_copy(update={"steer_fraction": 0.25}), 3, 2).needs()["unsafe"].shift_fraction == 0.25
    with pytest.raises(ValueError, match="steer_fraction"):
        RepBendConfig(target_layers=[2], steer_state=1, steer_fraction=0)
    with pytest.raises(RepbendError, match="out of range"):
        RepBend(RepBendConfig(target_layers=[2], steer_state=3), 3, 2).prepare(states)
    one = collate([Encoded([5], 1, 0)], pad_id=0)
    st = {"unsafe": States(hidden={2: torch.zeros(1, 1, 2)})}
    with pytest.raises(RepbendError, match="call prepare"):
        RepBend(cfg, 3, 2)({"unsafe": one}, st, st, 0.0)


def _naive_safe_nll(batch, states):
    """mean over every response token t >= 1 of the safe rows of -log softmax(head(final[t-1]))[token t]."""
    vals = []
    for i in range(batch.size):
        for t in range(1, batch.input_ids.shape[1]):
            if batch.response_mask[i, t]:
                logp = torch.log_softmax(states.head(states.final[i, t - 1]).float(), -1)
                vals.append(-logp[batch.input_ids[i, t]])
    return sum(vals) / len(vals)


def test_nll_term_is_the_mean_response_token_nll_of_the_safe_rows():
    # nu alone: the safe rows need logits only (no reference pass, no hidden states)
    only = RepBend(RepBendConfig(alpha=0, beta=0, gamma=0, epsilon=0, nu=1.0, target_layers=[1]), L, H)
    assert set(only.needs()) == {"safe"}
    need = only.needs()["safe"]
    assert need.logits and not need.reference and need.layers == ()
    m, batch, pol, ref = _setup(RepBendConfig(alpha=0, beta=0, gamma=0, epsilon=0, nu=1.0, target_layers=[1]))
    loss, parts = m(batch, pol, ref, 0.0)
    want = float(_naive_safe_nll(batch["safe"], pol["safe"]))
    assert set(parts) == {"loss/nll"} and parts["loss/nll"] == pytest.approx(want, rel=1e-6)
    assert float(loss) == pytest.approx(want, rel=1e-6)
    # with the other terms: nu adds exactly nu * L_NLL to the loss and changes nothing else
    base = dict(alpha=0.5, beta=0.3, gamma=0.2, epsilon=0.7, target_start=2, target_window=2, max_unsafe_ratio=None)
    m2, batch2, pol2, ref2 = _setup(RepBendConfig(**base, nu=0.25))
    assert m2.needs()["safe"].logits and m2.needs()["safe"].reference
    with_nll, parts2 = m2(batch2, pol2, ref2, 0.0)
    no_nll = RepBend(RepBendConfig(**base), L, H)
    without, parts0 = no_nll(batch2, pol2, ref2, 0.0)
    assert parts2["loss/nll"] == pytest.approx(float(_naive_safe_nll(batch2["safe"], pol2["safe"])), rel=1e-6)
    assert float(with_nll) == pytest.approx(float(without) + 0.25 * parts2["loss/nll"], rel=1e-6)
    assert {k: v for k, v in parts2.items() if k != "loss/nll"} == parts0


def test_nll_term_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="nu"):
        RepBendConfig(nu=-1)
    m, batch, pol, ref = _setup(RepBendConfig(alpha=0, nu=1.0, target_layers=[1]))
    with pytest.raises(RepbendError, match="nu"):
        m.check_batch(dict(batch, safe=_batch([(3, 0), (4, 0)])))
    with pytest.raises(RepbendError, match="no 'safe' rows"):
        m.check_batch({k: v for k, v in batch.items() if k != "safe"})


def test_nll_term_on_the_pair_split_uses_each_unsafe_requests_refusal():
    m, batch, pol, ref = _setup(RepBendConfig(alpha=0, beta=0, gamma=0, epsilon=0, nu=1.0, nll_split="pair",
                                              target_layers=[1]))
    needs = m.needs()
    assert set(needs) == {"pair"} and needs["pair"].policy and needs["pair"].logits and not needs["pair"].reference
    _, parts = m(batch, pol, ref, 0.0)
    assert parts["loss/nll"] == pytest.approx(float(_naive_safe_nll(batch["pair"], pol["pair"])), rel=1e-6)
    # with L_pair on as well, the pair rows need both passes (reference states for L_pair, policy logits for L_NLL)
    both = RepBend(RepBendConfig(eta=1.0, nu=1.0, nll_split="pair", target_layers=[1]), L, H).needs()["pair"]
    assert both.policy and both.reference and both.logits and both.layers == (1,)
    with pytest.raises(RepbendError, match="one refusal row per unsafe row"):
        m.check_batch(dict(batch, pair=_batch([(3, 2)])))
