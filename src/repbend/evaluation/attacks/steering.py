"""Activation steering: push the model's residual stream from "harmful request" towards "harmless request".

The probe-based steering attacks reported against RepBend models (docs/EVALUATION.md) read a direction
that tells harmful from harmless requests off the model's own states and move the states along it
while the model answers. This attack does that with the simplest such direction, the difference of
means (the one :mod:`refusal_direction` also starts from), and ADDS a multiple of it instead of
projecting it out:

1. Harmful training-side requests (AdvBench minus anything matching an evaluation behaviour) and the
   project's harmless requests: mean state at the last prompt token of every block output; per
   hidden state ``l`` the unit direction ``r_l`` and the gap ``g_l = |mean harmful - mean harmless|``.
2. Validation on held-out AdvBench requests: for each candidate state ``l`` and coefficient ``c``
   generate short greedy answers with ``h_l <- h_l - c * g_l * r_l`` at every position (prompt and
   answer; ``c = 1`` moves the harmful mean onto the harmless one) and count answers that are neither
   refusals (``judges.refusal.is_refusal``) nor gibberish (``judges.gibberish.is_gibberish``). The
   candidate with the most such answers wins (ties: fewer refusals, then the smaller ``c``): a setting
   that only breaks the model does not win.
3. The evaluation behaviours are sent as direct requests with the winning steer applied (forward hook
   on that block's output; the caller's model is left as it was when the attack returns).
"""
from __future__ import annotations

import contextlib
import random
import time
from typing import Any, ClassVar, Iterator

import torch
from pydantic import Field

from repbend.config import Section
from repbend.errors import RepbendError
from repbend.evaluation.attacks import whitebox_common as wb
from repbend.evaluation.attacks.refusal_direction import decoder_layers, last_token_states
from repbend.evaluation.store import make_key
from repbend.evaluation.types import Attack, Behaviour, Completion, Conversation, GenSettings


class SteeringConfig(Section):
    n_train: int = Field(32, description="Harmful and harmless requests (each) used to compute the directions.")
    n_val: int = Field(8, description="Held-out harmful requests used to choose the layer and coefficient.")
    layers: list[int] | None = Field(None, description="Candidate hidden-state indices (1..L-1, block outputs); "
                                                       "default: n_candidates evenly spaced over 25%..75% of the depth.")
    n_candidates: int = Field(3, description="Number of candidate layers when layers is not given.")
    coefficients: list[float] = Field([1.0, 2.0, 4.0], min_length=1,
                                      description="Candidate steering strengths c, in units of the gap between the "
                                                  "harmful and harmless means at that layer.")
    val_max_new_tokens: int = Field(48, description="Answer length used during validation (the gibberish "
                                                   "statistics need a few dozen words).")
    batch_size: int = Field(16, description="Requests per forward pass.")
    max_new_tokens: int | None = Field(None, description="Answer length of the attack; default: the suite's.")
    seed: int = Field(0, description="Seed for the choice of training/validation requests.")


def _block_index(model: Any, layer: int) -> Any:
    """The decoder block whose output is hidden state ``layer`` (1-based: state i = output of block i)."""
    return decoder_layers(model)[layer - 1]


@contextlib.contextmanager
def steering_hooks(model: Any, layer: int, shift: torch.Tensor) -> Iterator[None]:
    """Add ``shift`` (d,) to hidden state ``layer`` (output of block ``layer``) at every position; always removed."""
    def hook(_m, _inp, out):
        if isinstance(out, tuple):
            return (out[0] + shift.to(out[0].dtype).to(out[0].device), *out[1:])
        return out + shift.to(out.dtype).to(out.device)

    handle = _block_index(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def validate(model: Any, tokenizer: Any, shifts: dict[tuple[int, float], torch.Tensor], prompts: list[str],
             cfg: SteeringConfig) -> list[dict]:
    """Refused / gibberish / answered counts on ``prompts`` for each candidate steer (and none)."""
    from repbend.evaluation.judges.gibberish import is_gibberish
    from repbend.evaluation.judges.refusal import is_refusal
    from repbend.models.generation import generate

    rows = []
    for cand in [None, *shifts]:
        ctx = steering_hooks(model, cand[0], shifts[cand]) if cand is not None else contextlib.nullcontext()
        with ctx:
            texts = [t[0] for t in generate(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                                            max_new_tokens=cfg.val_max_new_tokens, batch_size=cfg.batch_size,
                                            progress=False)]
        refused = sum(is_refusal(t) for t in texts)
        gib = sum(is_gibberish(t) and not is_refusal(t) for t in texts)
        rows.append({"layer": None if cand is None else cand[0], "coefficient": None if cand is None else cand[1],
                     "refused": refused, "gibberish": gib, "answered": len(texts) - refused - gib})
    return rows


class Steering(Attack):
    """Direct requests while the residual stream is shifted from the harmful towards the harmless mean."""

    name: ClassVar[str] = "steering"
    white_box: ClassVar[bool] = True
    needs_target: ClassVar[bool] = False
    Config = SteeringConfig

    def __init__(self, config: SteeringConfig | None = None):
        self.config = config or SteeringConfig()
        c = self.config
        wb.check_positive(self.name, n_train=c.n_train, n_val=c.n_val, n_candidates=c.n_candidates,
                          val_max_new_tokens=c.val_max_new_tokens, batch_size=c.batch_size,
                          max_new_tokens=c.max_new_tokens)
        if any(x <= 0 for x in c.coefficients):
            raise RepbendError(f"Attack 'steering': coefficients must be > 0, got {c.coefficients}.")

    def candidate_layers(self, num_layers: int) -> list[int]:
        if self.config.layers:
            bad = [i for i in self.config.layers if not 1 <= i <= num_layers - 1]
            if bad:
                raise RepbendError(f"Attack 'steering': layers {bad} out of range; use hidden-state indices "
                                   f"1..{num_layers - 1} (block outputs).")
            return sorted(set(self.config.layers))
        lo, hi = max(1, round(num_layers * 0.25)), max(1, round(num_layers * 0.75))
        n = min(self.config.n_candidates, hi - lo + 1)
        return sorted({round(lo + i * (hi - lo) / max(1, n - 1)) for i in range(n)})

    def find_steer(self, model: Any, tokenizer: Any, behaviours: list[Behaviour], cost: wb.Cost) -> dict:
        c = self.config
        rng = random.Random(c.seed)
        harmful = [g for g, _ in wb.advbench_pairs(exclude=behaviours)]
        harmless = list(wb.harmless_prompts())   # a copy: the shuffle below must not reorder the caller's list
        rng.shuffle(harmful)
        rng.shuffle(harmless)
        if len(harmful) < c.n_train + c.n_val or len(harmless) < c.n_train:
            raise RepbendError(f"Attack 'steering': n_train + n_val = {c.n_train + c.n_val} exceeds the available "
                               f"requests ({len(harmful)} harmful, {len(harmless)} harmless); lower them.")
        with wb.frozen(model):
            h = last_token_states(model, tokenizer, harmful[:c.n_train], c.batch_size)
            b = last_token_states(model, tokenizer, harmless[:c.n_train], c.batch_size)
            cost.forward += 2 * c.n_train
            diff = h.mean(1) - b.mean(1)                          # (L+1, d)
            layers = self.candidate_layers(diff.shape[0] - 1)
            shifts = {(l, co): -co * diff[l] for l in layers for co in sorted(set(c.coefficients))}
            val = harmful[c.n_train:c.n_train + c.n_val]
            rows = validate(model, tokenizer, shifts, val, c)
            cost.forward += len(rows) * c.n_val * (c.val_max_new_tokens + 1)
        best = min(rows[1:], key=lambda r: (-r["answered"], r["refused"], r["coefficient"], r["layer"]))
        l, co = best["layer"], best["coefficient"]
        return {"layer": l, "coefficient": co, "shift": shifts[(l, co)].tolist(),
                "gap": float(diff[l].norm()), "validation": rows,
                "harmful_source": "advbench (evaluation behaviours removed)", "harmless_source": "project benign"}

    def run(self, behaviours: list[Behaviour], target: Any, store: Any) -> list[Completion]:
        key = make_key("whitebox", self.name, self.config.model_dump(), getattr(target, "fingerprint", ""), "steer",
                       sorted(b.id for b in behaviours))
        cost = wb.Cost()
        rec = store.get(key)
        if rec is None:
            rec = {"kind": "whitebox", "attack": self.name, **self.find_steer(target.model, target.tokenizer,
                                                                            behaviours, cost)}
            rec["steer_cost"] = cost.as_dict()
            store.put(key, rec)
        self.provenance = {"harmful": rec["harmful_source"], "harmless": rec["harmless_source"],
                           "layer": rec["layer"], "coefficient": rec["coefficient"]}
        settings = wb.suite_settings(target)
        if self.config.max_new_tokens:
            settings = GenSettings(**{**settings.__dict__, "max_new_tokens": self.config.max_new_tokens})
        variant = f"layer{rec['layer']}_c{rec['coefficient']:g}"
        convs = [Conversation(b.id, self.name, variant, [{"role": "user", "content": b.full_prompt}]) for b in behaviours]
        t0 = time.perf_counter()
        with steering_hooks(target.model, rec["layer"], torch.tensor(rec["shift"])), \
                wb.swapped_model(target, target.model, f"{self.name}:{key[:12]}"):
            texts = target.generate(convs, settings)
        gen_s = (time.perf_counter() - t0) / max(1, len(behaviours))
        d = rec["steer_cost"]
        per = {"seconds": round(d["seconds"] / max(1, len(behaviours)) + gen_s, 3),
               "steer_seconds_total": d["seconds"], "forward_passes_total": d["forward_passes"]}
        meta = {"layer": rec["layer"], "coefficient": rec["coefficient"], "gap": rec["gap"],
                "validation": rec["validation"], "cost": per}
        by_id = {b.id: b for b in behaviours}
        return [wb.completion(by_id[cv.behaviour_id], self.name, variant, cv.messages, t, k, meta)
                for cv, ts in zip(convs, texts) for k, t in enumerate(ts)]
