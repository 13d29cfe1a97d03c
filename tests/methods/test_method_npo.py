"""NPO loss: sign, hand-derived numbers, naive re-computation, padding, gradient direction, retain terms, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from repbend.data.chat import Encoded, collate
from repbend.errors import RepbendError
from repbend.methods import METHODS
from repbend.methods.base import States
from repbend.methods.npo import NPO, NPOConfig, npo_loss, sequence_logprob

L, H, V = 4, 6, 13


def _batch(shapes, seed=0, side="right"):
    g = torch.Generator().manual_seed(seed)
    items = [Encoded(torch.randint(1, V, (a + b,), generator=g).tolist(), a, b) for a, b in shapes]
    return collate(items, pad_id=0, padding_side=side)


def _head(seed):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        head.bias.copy_(torch.randn(V, generator=g))
    return head


def _setup(cfg, seed=0, side="right"):
    m = NPO(cfg, num_layers=L, hidden_size=H)
    batch = {"unsafe": _batch([(4, 3), (2, 5), (3, 1)], seed, side), "safe": _batch([(3, 4), (5, 1)], seed + 1, side),
             "retain": _batch([(3, 3), (6, 1), (2, 2)], seed + 2, side)}
    g = torch.Generator().manual_seed(seed + 7)
    pol_head, ref_head = _head(seed + 20), _head(seed + 21)
    pol, ref = {}, {}
    for s, need in m.needs().items():
        B, T = batch[s].input_ids.shape
        pol[s] = States(final=torch.randn(B, T, H, generator=g).requires_grad_(), head=pol_head)
        if need.reference:
            ref[s] = States(final=torch.randn(B, T, H, generator=g), head=ref_head)
    return m, batch, pol, ref


def _naive_seq_logprob(st: States, b):
    out = []
    logp = torch.log_softmax(st.head(st.final).float(), dim=-1)   # (B, T, V)
    for i in range(b.size):
        total = 0.0
        for t in range(1, b.input_ids.shape[1]):
            if b.response_mask[i, t]:
                total += logp[i, t - 1, b.input_ids[i, t]].item()
        out.append(total)
    return torch.tensor(out)


def test_registered():
    assert METHODS.get("npo") is NPO


def test_hand_derived_tiny_case():
    """beta = 1. Row 1: log-ratio r = ln 3 -> log sigmoid(-ln 3) = ln(1/4) -> term = -ln 4.
    Row 2: r = 0 -> log sigmoid(0) = -ln 2. L = -(2/1) * mean(-ln 4, -ln 2) = ln 4 + ln 2 = 3 ln 2 = 2.07944.
    At the start (policy = reference) L = (2/beta) ln 2 for any beta.
    """
    loss = npo_loss(torch.tensor([math.log(3) - 1.0, -2.0]), torch.tensor([-1.0, -2.0]), beta=1.0)
    assert float(loss) == pytest.approx(3 * math.log(2), rel=1e-6)
    assert float(npo_loss(torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1)) == pytest.approx(20 * math.log(2))


def test_sign_lower_logprob_gives_lower_loss():
    ref = torch.tensor([-10.0])
    assert npo_loss(torch.tensor([-12.0]), ref, 0.1) < npo_loss(torch.tensor([-10.0]), ref, 0.1) \
        < npo_loss(torch.tensor([-8.0]), ref, 0.1)


@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_logprob_matches_naive(side):
    m, batch, pol, _ = _setup(NPOConfig(gamma=0), side=side)
    got = sequence_logprob(pol["unsafe"], batch["unsafe"])
    assert torch.allclose(got, _naive_seq_logprob(pol["unsafe"], batch["unsafe"]), rtol=1e-5, atol=1e-5)


def test_matches_naive_with_both_retain_terms():
    cfg = NPOConfig(beta=0.5, gamma=0.7, delta=0.3, kl_split="retain", kl_temperature=2.0)
    m, batch, pol, ref = _setup(cfg)
    loss, parts = m(batch, pol, ref, 0.0)
    lp = _naive_seq_logprob(pol["unsafe"], batch["unsafe"])
    rlp = _naive_seq_logprob(ref["unsafe"], batch["unsafe"])
    want_npo = -(2 / 0.5) * sum(math.log(1 / (1 + math.exp(0.5 * (a - b))))
                                for a, b in zip(lp.tolist(), rlp.tolist())) / len(lp)
    # NLL: mean over every safe response token of -log p(token | prefix)
    s = batch["safe"]
    logp = torch.log_softmax(pol["safe"].head(pol["safe"].final), -1)
    nll = [-logp[i, t - 1, s.input_ids[i, t]].item() for i in range(s.size)
           for t in range(1, s.input_ids.shape[1]) if s.response_mask[i, t]]
    # KL(ref || policy) at T = 2 on every real retain token, times T^2
    r = batch["retain"]
    kls = []
    for i in range(r.size):
        for t in range(r.input_ids.shape[1]):
            if r.attention_mask[i, t]:
                p = torch.softmax(ref["retain"].head(ref["retain"].final[i, t]) / 2, -1)
                q = torch.softmax(pol["retain"].head(pol["retain"].final[i, t]) / 2, -1)
                kls.append(4 * (p * (p.log() - q.log())).sum().item())
    assert parts["loss/npo"] == pytest.approx(want_npo, rel=1e-5)
    assert parts["loss/nll"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert parts["loss/kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert loss.item() == pytest.approx(want_npo + 0.7 * sum(nll) / len(nll) + 0.3 * sum(kls) / len(kls), rel=1e-5)


def test_padding_is_ignored():
    cfg = NPOConfig(gamma=1.0, delta=1.0)
    m, batch, pol, ref = _setup(cfg)
    loss, _ = m(batch, pol, ref, 0.0)
    for s, b in batch.items():
        pad = ~b.attention_mask.bool()
        assert pad.any()
        b.input_ids[pad] = 7                   # any token id at padding
        for st in [pol[s]] + ([ref[s]] if s in ref else []):
            st.final = torch.where(pad[..., None], torch.full_like(st.final, 50.0), st.final.detach())
    loss2, _ = m(batch, pol, ref, 0.0)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)


def test_gradient_lowers_unsafe_logprob():
    m, batch, pol, ref = _setup(NPOConfig(beta=0.1, gamma=0.0))
    st, b = pol["unsafe"], batch["unsafe"]
    before = sequence_logprob(st, b).detach()
    loss, _ = m(batch, pol, ref, 0.0)
    loss.backward()
    with torch.no_grad():
        st.final -= 0.05 * st.final.grad
        for p in st.head.parameters():
            p -= 0.05 * p.grad
    after = sequence_logprob(st, b).detach()
    assert bool((after < before).all())


def test_needs_follow_the_weights():
    assert set(NPO(NPOConfig(gamma=0, delta=0), L, H).needs()) == {"unsafe"}
    n = NPO(NPOConfig(gamma=1, delta=0.5, kl_split="retain"), L, H).needs()
    assert n["unsafe"].logits and n["unsafe"].reference
    assert n["safe"].logits and not n["safe"].reference
    assert n["retain"].logits and n["retain"].reference


def test_check_batch_errors():
    m, batch, _, _ = _setup(NPOConfig(gamma=1.0, delta=1.0))
    m.check_batch(batch)
    with pytest.raises(RepbendError, match="'unsafe' rows"):
        m.check_batch({k: v for k, v in batch.items() if k != "unsafe"})
    with pytest.raises(RepbendError, match="method.params.gamma"):
        m.check_batch({k: v for k, v in batch.items() if k != "safe"})
    with pytest.raises(RepbendError, match="method.params.delta"):
        m.check_batch({k: v for k, v in batch.items() if k != "retain"})
    with pytest.raises(RepbendError, match="no response token"):
        m.check_batch({**batch, "unsafe": collate([Encoded([3, 4], 2, 0)], pad_id=0)})


def test_config_errors_name_the_field():
    for bad, field in [({"beta": 0}, "beta"), ({"gamma": -1}, "gamma"), ({"delta": -0.1}, "delta"),
                       ({"kl_split": "unsafe"}, "kl_split"), ({"kl_temperature": 0}, "kl_temperature")]:
        with pytest.raises(ValueError, match=field):
            NPOConfig(**bad)
