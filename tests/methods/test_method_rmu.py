"""RMU loss: fixed random direction, hand-derived numbers, naive re-computation, padding, gradient, bad input."""
from __future__ import annotations

import pytest
import torch

from repbend.data.chat import Encoded, collate
from repbend.errors import ConfigError, RepbendError
from repbend.methods import METHODS
from repbend.methods.base import States
from repbend.methods.rmu import RMU, RMUConfig, random_direction

L, H, V = 6, 8, 11


def _batch(shapes, seed=0, side="right"):
    g = torch.Generator().manual_seed(seed)
    items = [Encoded(torch.randint(1, V, (a + b,), generator=g).tolist(), a, b) for a, b in shapes]
    return collate(items, pad_id=0, padding_side=side)


def _setup(cfg, seed=0, side="right"):
    m = RMU(cfg, num_layers=L, hidden_size=H)
    batch = {"unsafe": _batch([(4, 3), (2, 5), (3, 1)], seed, side), "safe": _batch([(3, 4), (5, 1)], seed + 1, side),
             "retain": _batch([(3, 3), (6, 1), (2, 2)], seed + 2, side)}
    g = torch.Generator().manual_seed(seed + 7)
    pol, ref = {}, {}
    for s, need in m.needs().items():
        B, T = batch[s].input_ids.shape
        pol[s] = States(hidden={l: torch.randn(B, T, H, generator=g).requires_grad_() for l in need.layers})
        if need.reference:
            ref[s] = States(hidden={l: torch.randn(B, T, H, generator=g) for l in need.layers})
    return m, batch, pol, ref


def test_registered():
    assert METHODS.get("rmu") is RMU


def test_random_direction_is_fixed_by_seed():
    u = random_direction(16, 3)
    assert torch.equal(u, random_direction(16, 3))
    assert not torch.equal(u, random_direction(16, 4))
    assert float(u.norm()) == pytest.approx(1.0, rel=1e-6)
    assert bool((u >= 0).all())  # U[0, 1) entries, normalised: all non-negative, as in the paper
    torch.manual_seed(0)
    a = RMU(RMUConfig(layer=3, seed=5), num_layers=L, hidden_size=H).u
    torch.manual_seed(1)  # the global RNG must not matter
    b = RMU(RMUConfig(layer=3, seed=5), num_layers=L, hidden_size=H).u
    assert torch.equal(a, b)


def test_hand_derived_tiny_case():
    """H = 2, c = 2, u = (1, 0), alpha = 3.

    Unsafe token h = (2, 1), target c*u = (2, 0): ||diff||^2 / H = 1 / 2 = 0.5 = L_forget.
    Retain token h = (1, 1), reference (0, 1): ||diff||^2 / H = 0.5 = L_retain.
    L = 0.5 + 3 * 0.5 = 2.0.
    """
    cfg = RMUConfig(layer=1, steering_coef=2.0, alpha=3.0, retain_splits=["retain"])
    m = RMU(cfg, num_layers=1, hidden_size=2)
    m.u = torch.tensor([1.0, 0.0])
    batch = {"unsafe": collate([Encoded([5, 6], 1, 1)], pad_id=0), "retain": collate([Encoded([5], 1, 0)], 0)}
    pol = {"unsafe": States(hidden={1: torch.tensor([[[2.0, 0.0], [2.0, 1.0]]])}),
           "retain": States(hidden={1: torch.tensor([[[1.0, 1.0]]])})}
    ref = {"retain": States(hidden={1: torch.tensor([[[0.0, 1.0]]])})}
    loss, parts = m(batch, pol, ref, 0.0)
    assert parts["loss/forget"] == pytest.approx(0.5)
    assert parts["loss/retain"] == pytest.approx(0.5)
    assert loss.item() == pytest.approx(2.0)


@pytest.mark.parametrize("mode", ["request_response", "response_all"])
def test_matches_naive(mode):
    cfg = RMUConfig(layer=4, steering_coef=5.0, alpha=7.0, forget_tokens=mode, seed=11)
    m, batch, pol, ref = _setup(cfg)
    loss, parts = m(batch, pol, ref, 0.3)
    cu = 5.0 * random_direction(H, 11)
    b = batch["unsafe"]
    f = [((pol["unsafe"].hidden[4][i, t] - cu) ** 2).mean().item()
         for i in range(b.size) for t in range(b.input_ids.shape[1])
         if (b.response_mask[i, t] if mode == "response_all" else b.attention_mask[i, t])]
    r = [((pol[s].hidden[4][i, t] - ref[s].hidden[4][i, t]) ** 2).mean().item()
         for s in ("retain", "safe") for i in range(batch[s].size) for t in range(batch[s].input_ids.shape[1])
         if batch[s].attention_mask[i, t]]
    want_f, want_r = sum(f) / len(f), sum(r) / len(r)
    assert parts["loss/forget"] == pytest.approx(want_f, rel=1e-5)
    assert parts["loss/retain"] == pytest.approx(want_r, rel=1e-5)
    assert loss.item() == pytest.approx(want_f + 7.0 * want_r, rel=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_ignored(side):
    m, batch, pol, ref = _setup(RMUConfig(layer=2), side=side)
    loss, _ = m(batch, pol, ref, 0.0)
    for s, b in batch.items():
        pad = ~b.attention_mask.bool()
        assert pad.any()
        for st in [pol[s]] + ([ref[s]] if s in ref else []):
            st.hidden[2] = torch.where(pad[..., None], torch.full_like(st.hidden[2], -1e3), st.hidden[2].detach())
    loss2, _ = m(batch, pol, ref, 0.0)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)


def test_gradient_moves_unsafe_activations_toward_the_random_direction():
    m, batch, pol, ref = _setup(RMUConfig(layer=3, steering_coef=4.0, alpha=1.0))
    h = pol["unsafe"].hidden[3]
    cu = 4.0 * m.u
    mask = batch["unsafe"].attention_mask.bool()
    before = (h[mask] - cu).norm(dim=-1).mean().item()
    m(batch, pol, ref, 0.0)[0].backward()
    with torch.no_grad():
        after = ((h - 0.5 * h.grad)[mask] - cu).norm(dim=-1).mean().item()
    assert after < before
    assert float(h.grad[~mask].abs().sum()) == 0.0  # padding gets no gradient


def test_trainable_layers_and_needs():
    m = RMU(RMUConfig(layer=4), num_layers=L, hidden_size=H)
    assert m.trainable_layers() == [1, 2, 3]           # blocks producing hidden states 2, 3, 4
    assert m.needs()["unsafe"].layers == (4,) and not m.needs()["unsafe"].reference
    assert m.needs()["safe"].reference and m.needs()["retain"].reference
    assert RMU(RMUConfig(layer=1), num_layers=L, hidden_size=H).trainable_layers() == [0]
    assert RMU(RMUConfig(layer=5, trainable_layers=[4, 0]), num_layers=L, hidden_size=H).trainable_layers() == [0, 4]


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="method.params.layer"):
        RMU(RMUConfig(layer=8), num_layers=L, hidden_size=H)
    with pytest.raises(ConfigError, match="method.params.trainable_layers"):
        RMU(RMUConfig(layer=3, trainable_layers=[3]), num_layers=L, hidden_size=H)
    with pytest.raises(ValueError, match="steering_coef"):
        RMUConfig(steering_coef=0)
    with pytest.raises(ValueError, match="layer"):
        RMUConfig(layer=0)
    with pytest.raises(ValueError, match="trainable_layers"):
        RMUConfig(trainable_layers=[1, 1])


def test_check_batch_errors():
    m, batch, _, _ = _setup(RMUConfig(layer=2))
    m.check_batch(batch)
    with pytest.raises(RepbendError, match="'unsafe' rows"):
        m.check_batch({k: v for k, v in batch.items() if k != "unsafe"})
    with pytest.raises(RepbendError, match="'retain' rows"):
        m.check_batch({k: v for k, v in batch.items() if k != "retain"})
    m2 = RMU(RMUConfig(layer=2, forget_tokens="response_all"), num_layers=L, hidden_size=H)
    with pytest.raises(RepbendError, match="method.params.forget_tokens"):
        m2.check_batch({**batch, "unsafe": collate([Encoded([3, 4], 2, 0)], pad_id=0)})
