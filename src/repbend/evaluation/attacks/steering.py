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
import time
from typing import Any, ClassVar

import torch
from pydantic import Field, PositiveFloat

from repbend.config import Section
from repbend.evaluation.attacks import whitebox_common as wb
from repbend.evaluation.attacks.refusal_direction import candidate_layers, contrast_states
from repbend.evaluation.store import make_key
from repbend.evaluation.types import Attack, Behaviour, Completion, Conversation, GenSettings
from repbend.models.hooks import shift_block_outputs


class SteeringConfig(Section):
    n_train: int = Field(32, gt=0, description="Harmful and harmless requests (each) used to compute the directions.")
    n_val: int = Field(8, gt=0, description="Held-out harmful requests used to choose the layer and coefficient.")
    layers: list[int] | None = Field(None, description="Candidate hidden-state indices (1..L-1, block outputs); "
                                                       "default: n_candidates evenly spaced over 25%..75% of the depth.")
    n_candidates: int = Field(3, gt=0, description="Number of candidate layers when layers is not given.")
    coefficients: list[PositiveFloat] = Field([1.0, 2.0, 4.0], min_length=1,
                                      description="Candidate steering strengths c, in units of the gap between the "
                                                  "harmful and harmless means at that layer.")
    val_max_new_tokens: int = Field(48, gt=0, description="Answer length used during validation (the gibberish "
                                                   "statistics need a few dozen words).")
    batch_size: int = Field(16, gt=0, description="Requests per forward pass.")
    max_new_tokens: int | None = Field(None, gt=0, description="Answer length of the attack; default: the suite's.")
    seed: int = Field(0, description="Seed for the choice of training/validation requests.")


def steering_hooks(model: Any, layer: int, shift: torch.Tensor):
    """Add ``shift`` (d,) to hidden state ``layer`` (output of block ``layer``) of every row at every position."""
    return shift_block_outputs(model, [(slice(None), {layer: shift})])


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

    def candidate_layers(self, num_layers: int) -> list[int]:
        return candidate_layers(self.name, self.config.layers, self.config.n_candidates, num_layers)

    def find_steer(self, model: Any, tokenizer: Any, behaviours: list[Behaviour], cost: wb.Cost) -> dict:
        c = self.config
        with wb.frozen(model):
            h, b, val, _ = contrast_states(self.name, model, tokenizer, behaviours, c, cost)
            diff = h.mean(1) - b.mean(1)                          # (L+1, d)
            layers = self.candidate_layers(diff.shape[0] - 1)
            shifts = {(l, co): -co * diff[l] for l in layers for co in sorted(set(c.coefficients))}
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
