"""Circuit Breakers loss: hand-derived numbers, naive re-computation, padding, schedule, gradient, bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from repbend.data.chat import Encoded, collate
from repbend.errors import ConfigError, RepbendError
from repbend.methods import METHODS
from repbend.methods.base import States
from repbend.methods.circuit_breakers import CircuitBreakers, CircuitBreakersConfig

L, H, V = 4, 6, 11


def _batch(shapes, seed=0, side="right"):
    g = torch.Generator().manual_seed(seed)
    items = [Encoded(torch.randint(1, V, (a + b,), generator=g).tolist(), a, b) for a, b in shapes]
    return collate(items, pad_id=0, padding_side=side)


def _setup(cfg, seed=0, side="right"):
    m = CircuitBreakers(cfg, num_layers=L, hidden_size=H)
    batch = {"unsafe": _batch([(4, 3), (2, 5), (3, 3)], seed, side), "safe": _batch([(3, 4), (5, 1)], seed + 1, side),
             "retain": _batch([(3, 3), (6, 1), (2, 2)], seed + 2, side)}
    g = torch.Generator().manual_seed(seed + 7)
    pol, ref = {}, {}
    for s, need in m.needs().items():
        B, T = batch[s].input_ids.shape
        pol[s] = States(hidden={l: torch.randn(B, T, H, generator=g).requires_grad_() for l in need.layers})
        ref[s] = States(hidden={l: torch.randn(B, T, H, generator=g) for l in need.layers})
    return m, batch, pol, ref


def test_registered():
    assert METHODS.get("circuit_breakers") is CircuitBreakers


def test_hand_derived_tiny_case():
    """One layer, H = 2, progress 0.5, alpha 2 -> c_rr = 2 * (1 - 0.25) = 1.5, c_retain = 2 * 0.25 = 0.5.

    Unsafe response token: policy (1, 0), reference (1, 1) -> cos = 1/sqrt(2) = 0.70711 -> ReLU = 0.70711.
    Second unsafe token: policy (-1, 0), reference (1, 0) -> cos = -1 -> ReLU = 0; L_rr = 0.70711 / 2 = 0.35355.
    Retain token: policy (3, 4), reference (0, 0) -> L2 = 5.
    L = 1.5 * 0.35355 + 0.5 * 5 = 3.03033.
    """
    cfg = CircuitBreakersConfig(alpha=2.0, target_layers=[1], retain_layers=[1], retain_splits=["retain"])
    m = CircuitBreakers(cfg, num_layers=1, hidden_size=2)
    batch = {"unsafe": collate([Encoded([5, 6, 7], 1, 2)], pad_id=0), "retain": collate([Encoded([5], 1, 0)], 0)}
    pol = {"unsafe": States(hidden={1: torch.tensor([[[9.0, 9.0], [1.0, 0.0], [-1.0, 0.0]]])}),
           "retain": States(hidden={1: torch.tensor([[[3.0, 4.0]]])})}
    ref = {"unsafe": States(hidden={1: torch.tensor([[[9.0, 9.0], [1.0, 1.0], [1.0, 0.0]]])}),
           "retain": States(hidden={1: torch.zeros(1, 1, 2)})}
    loss, parts = m(batch, pol, ref, 0.5)
    assert parts["coef/reroute"] == pytest.approx(1.5) and parts["coef/retain"] == pytest.approx(0.5)
    assert parts["loss/reroute"] == pytest.approx(1 / math.sqrt(2) / 2, rel=1e-6)
    assert parts["loss/retain"] == pytest.approx(5.0)
    assert loss.item() == pytest.approx(1.5 / math.sqrt(2) / 2 + 2.5, rel=1e-6)


def _naive(m, batch, pol, ref, progress):
    c = m.config
    p = progress
    rr = []
    for l in m.target:
        for i in range(batch["unsafe"].size):
            b = batch["unsafe"]
            for t in range(b.input_ids.shape[1]):
                pick = b.response_mask[i, t] if c.reroute_tokens == "response_all" else b.attention_mask[i, t]
                if pick:
                    cos = F.cosine_similarity(pol["unsafe"].hidden[l][i, t], ref["unsafe"].hidden[l][i, t], dim=0)
                    rr.append(max(cos.item(), 0.0))
    ret = []
    for s in c.retain_splits:
        b = batch[s]
        for l in m.retain:
            for i in range(b.size):
                for t in range(b.input_ids.shape[1]):
                    if b.attention_mask[i, t]:
                        ret.append(torch.dist(pol[s].hidden[l][i, t], ref[s].hidden[l][i, t]).item())
    rr_mean, ret_mean = sum(rr) / len(rr), sum(ret) / len(ret)
    return c.alpha * (1 - p / 2) * rr_mean + c.alpha * p / 2 * ret_mean, rr_mean, ret_mean


@pytest.mark.parametrize("mode", ["response_all", "request_response"])
@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_matches_naive(mode, progress):
    cfg = CircuitBreakersConfig(alpha=3.0, target_layers=[2, 3], reroute_tokens=mode)
    m, batch, pol, ref = _setup(cfg)
    loss, parts = m(batch, pol, ref, progress)
    want, rr, ret = _naive(m, batch, pol, ref, progress)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert parts["loss/reroute"] == pytest.approx(rr, rel=1e-5)
    assert parts["loss/retain"] == pytest.approx(ret, rel=1e-5)


def test_retain_all_layers_means_every_hidden_state():
    m = CircuitBreakers(CircuitBreakersConfig(target_layers=[2]), num_layers=L, hidden_size=H)
    assert m.needs()["retain"].layers == tuple(range(L + 1))
    assert m.needs()["unsafe"] == m.needs()["unsafe"].__class__(layers=(2,), reference=True)
    assert m.trainable_layers() == [0, 1, 2]   # adapters on blocks 0..max(target), as the paper's code
    assert CircuitBreakers(CircuitBreakersConfig(target_layers=[L]), L, H).trainable_layers() == list(range(L))


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_ignored(side):
    cfg = CircuitBreakersConfig(target_layers=[1, 3], reroute_tokens="request_response")
    m, batch, pol, ref = _setup(cfg, side=side)
    loss, _ = m(batch, pol, ref, 0.6)
    for s, b in batch.items():
        pad = ~b.attention_mask.bool()
        assert pad.any()
        for st in (pol[s], ref[s]):
            for l, h in st.hidden.items():
                st.hidden[l] = torch.where(pad[..., None], torch.full_like(h, 1e3), h.detach())
    loss2, _ = m(batch, pol, ref, 0.6)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)


def test_schedule_values():
    m = CircuitBreakers(CircuitBreakersConfig(alpha=10.0, target_layers=[1]), num_layers=L, hidden_size=H)
    assert m.coefficients(0.0) == pytest.approx((10.0, 0.0))
    assert m.coefficients(0.5) == pytest.approx((7.5, 2.5))
    assert m.coefficients(1.0) == pytest.approx((5.0, 5.0))


def test_reroute_gradient_lowers_cosine():
    cfg = CircuitBreakersConfig(alpha=1.0, target_layers=[2])
    m, batch, pol, ref = _setup(cfg)
    # start the policy near the reference (cos ~ 0.9; at cos = 1 exactly the gradient of cos vanishes),
    # then take one gradient step on the unsafe states at progress 0
    r = ref["unsafe"].hidden[2]
    noise = torch.randn(r.shape, generator=torch.Generator().manual_seed(3))
    pol["unsafe"].hidden[2] = (r + 0.4 * noise).requires_grad_()
    _, before = m(batch, pol, ref, 0.0)
    loss, _ = m(batch, pol, ref, 0.0)
    loss.backward()
    with torch.no_grad():
        stepped = pol["unsafe"].hidden[2] - 20.0 * pol["unsafe"].hidden[2].grad
    pol["unsafe"].hidden[2] = stepped
    _, after = m(batch, pol, ref, 0.0)
    assert before["cos/unsafe"] > 0.8
    assert after["cos/unsafe"] < before["cos/unsafe"] - 0.05
    assert after["loss/reroute"] < before["loss/reroute"]


def test_retain_term_gradient_is_zero_at_progress_zero_and_nonzero_later():
    cfg = CircuitBreakersConfig(alpha=1.0, target_layers=[2])
    m, batch, pol, ref = _setup(cfg)
    m(batch, pol, ref, 0.0)[0].backward()
    assert pol["retain"].hidden[0].grad is None or float(pol["retain"].hidden[0].grad.abs().sum()) == 0
    m(batch, pol, ref, 1.0)[0].backward()
    assert float(pol["retain"].hidden[0].grad.abs().sum()) > 0


def test_check_batch_errors():
    m, batch, _, _ = _setup(CircuitBreakersConfig(target_layers=[1]))
    m.check_batch(batch)
    with pytest.raises(RepbendError, match="'unsafe' rows"):
        m.check_batch({k: v for k, v in batch.items() if k != "unsafe"})
    with pytest.raises(RepbendError, match="'safe' rows"):
        m.check_batch({k: v for k, v in batch.items() if k != "safe"})
    no_resp = {**batch, "unsafe": collate([Encoded([3, 4], 2, 0)], pad_id=0)}
    with pytest.raises(RepbendError, match="method.params.reroute_tokens"):
        m.check_batch(no_resp)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="method.params.target_layers"):
        CircuitBreakers(CircuitBreakersConfig(target_layers=[10, 20]), num_layers=L, hidden_size=H)
    with pytest.raises(ConfigError, match="method.params.retain_layers"):
        CircuitBreakers(CircuitBreakersConfig(target_layers=[1], retain_layers=[0, 9]), num_layers=L, hidden_size=H)
    with pytest.raises(ValueError, match="target_layers"):
        CircuitBreakersConfig(target_layers=[2, 2])
    with pytest.raises(ValueError, match="target_layers"):
        CircuitBreakersConfig(target_layers=[0, 3])
    with pytest.raises(ValueError, match="alpha"):
        CircuitBreakersConfig(alpha=-1)
    with pytest.raises(ValueError, match="reroute_tokens"):
        CircuitBreakersConfig(reroute_tokens="everything")
