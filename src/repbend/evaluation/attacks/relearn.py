"""Re-learning (harmful fine-tuning) attack: a few LoRA SFT steps on harmful pairs, then direct requests.

Training pairs are disjoint from the evaluation behaviours (normalised-text match removed):

* ``data``: a built data set folder (``repbend data build``): its ``harmful`` rows (harmful request +
  complying answer), the strongest choice;
* otherwise AdvBench goals with their own targets ("Sure, here is ..."), which teach the model to
  open with compliance but carry no harmful content.

A new LoRA adapter is trained on a COPY of the model (existing adapters merged in first), so the caller's
model is never changed. The behaviours are answered at steps 0, k/2 and k (variants ``step0``,
``step<k/2>``, ``step<k>``; ``checkpoints`` overrides), so a report shows how quickly safety returns to
being broken. Each checkpoint's answers are stored as soon as they exist; a resumed run that finds all
of them stored trains nothing.
"""
from __future__ import annotations

import random
import time
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from repbend.config import Section
from repbend.errors import RepbendError
from repbend.evaluation.attacks import whitebox_common as wb
from repbend.evaluation.store import make_key
from repbend.evaluation.types import Attack, Behaviour, Completion, Conversation, GenSettings
from repbend.seeding import seed_everything


class RelearnConfig(Section):
    steps: int = Field(20, gt=0, description="LoRA fine-tuning steps (k).")
    checkpoints: list[int] | None = Field(None, description="Steps at which to attack; default [0, k/2, k].")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate of the adapter.")
    batch_size: int = Field(4, gt=0, description="Pairs per step.")
    n_train: int = Field(64, gt=0, description="Harmful pairs in the fine-tuning set (cycled).")
    lora_r: int = Field(8, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(16, gt=0, description="LoRA alpha.")
    target_modules: str | list[str] = Field("all-linear", description="Modules that get LoRA (peft syntax).")
    max_length: int = Field(256, gt=0, description="Tokens per training sequence (request + answer).")
    data: str | None = Field(None, description="Built data set folder whose harmful rows to train on "
                                               "(default: AdvBench goals + targets).")
    max_new_tokens: int | None = Field(None, gt=0, description="Answer length of the attack; default: the suite's.")
    seed: int = Field(0, description="Seed for data order and adapter init.")


def training_pairs(cfg: RelearnConfig, behaviours: list[Behaviour]) -> tuple[list[tuple[list[dict], str]], str]:
    """(messages, answer) pairs disjoint from ``behaviours`` and a description of their source."""
    banned = {wb.normalise_text(b.prompt) for b in behaviours} | {wb.normalise_text(b.full_prompt) for b in behaviours}
    if cfg.data:
        from pathlib import Path

        from repbend.io import read_jsonl

        path = Path(cfg.data).expanduser() / "train.jsonl"
        if not path.is_file():
            raise RepbendError(f"Attack 'relearn': {path} does not exist; set relearn.data to a folder made by "
                               f"'repbend data build'.")
        rows = [r for r in read_jsonl(path) if r.get("kind") == "harmful" and r.get("response")]
        pairs = [(r["messages"], r["response"]) for r in rows
                 if wb.normalise_text(r["messages"][-1]["content"]) not in banned]
        source = f"built data set {cfg.data} (harmful rows)"
    else:
        pairs = [([{"role": "user", "content": g}], t) for g, t in wb.advbench_pairs(exclude=behaviours)]
        source = "advbench goals + targets"
    if not pairs:
        raise RepbendError(f"Attack 'relearn': no harmful training pairs in {source} after removing the evaluation "
                           f"behaviours; point relearn.data at a built data set with harmful rows.")
    random.Random(cfg.seed).shuffle(pairs)
    return pairs[:cfg.n_train], source


def sft_batch(tokenizer: Any, pairs: list[tuple[list[dict], str]], max_length: int, device: Any):
    """Right-padded ids, mask and labels (answer tokens only)."""
    from repbend.data.chat import encode

    enc = [encode(tokenizer, m, r, max_request_tokens=max_length // 2, max_response_tokens=max_length // 2)
           for m, r in pairs]
    width = max(len(e.input_ids) for e in enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(enc):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, e.request_len:n] = ids[i, e.request_len:n]
    return ids.to(device), mask.to(device), labels.to(device)


def sft_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)


class Relearn(Attack):
    """Harmful LoRA fine-tuning, then direct requests at several step counts."""

    name: ClassVar[str] = "relearn"
    white_box: ClassVar[bool] = True
    needs_target: ClassVar[bool] = False
    Config = RelearnConfig

    def __init__(self, config: RelearnConfig | None = None):
        self.config = config or RelearnConfig()
        c = self.config
        self.checkpoints = sorted(set(c.checkpoints if c.checkpoints is not None else [0, c.steps // 2, c.steps]))
        if any(s < 0 or s > c.steps for s in self.checkpoints):
            raise RepbendError(f"Attack 'relearn': checkpoints {self.checkpoints} must lie in 0..steps ({c.steps}).")

    def _key(self, target: Any, behaviours: list[Behaviour], step: int) -> str:
        return make_key("whitebox", self.name, self.config.model_dump(), getattr(target, "fingerprint", ""), step,
                        [(b.id, b.full_prompt) for b in behaviours])

    def run(self, behaviours: list[Behaviour], target: Any, store: Any) -> list[Completion]:
        from peft import LoraConfig, get_peft_model

        c = self.config
        keys = {s: self._key(target, behaviours, s) for s in self.checkpoints}
        settings = wb.suite_settings(target)
        if c.max_new_tokens:
            settings = GenSettings(**{**settings.__dict__, "max_new_tokens": c.max_new_tokens})
        if any(store.get(k) is None for k in keys.values()):
            pairs, source = training_pairs(c, behaviours)
            seed_everything(c.seed)
            cost = wb.Cost()
            model = get_peft_model(wb.plain_model(target.model), LoraConfig(
                r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=0.0, target_modules=c.target_modules,
                task_type="CAUSAL_LM"))
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=0.0)
            dev, losses = wb.model_device(model), []
            for step in range(c.steps + 1):
                if step in keys and store.get(keys[step]) is None:
                    model.eval()
                    convs = [Conversation(b.id, self.name, f"step{step}", [{"role": "user", "content": b.full_prompt}])
                             for b in behaviours]
                    t0 = time.perf_counter()
                    with wb.swapped_model(target, model, f"{self.name}:{keys[step][:12]}"):
                        texts = target.generate(convs, settings)
                    store.put(keys[step], {"kind": "whitebox", "attack": self.name, "step": step, "texts": texts,
                                           "behaviour_ids": [b.id for b in behaviours], "train_losses": list(losses),
                                           "train_source": source, "cost": {**cost.as_dict(share=len(behaviours)),
                                           "generation_seconds": round(time.perf_counter() - t0, 3)}})
                if step == c.steps or all(store.get(keys[s]) is not None for s in self.checkpoints):
                    break
                model.train()
                idx = [(step * c.batch_size + i) % len(pairs) for i in range(c.batch_size)]
                loss = sft_loss(model, *sft_batch(target.tokenizer, [pairs[i] for i in idx], c.max_length, dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                cost.forward += c.batch_size
                cost.backward += c.batch_size
                losses.append(round(float(loss.detach()), 5))
            del model, opt
        self.provenance = {"train": store.get(keys[self.checkpoints[-1]])["train_source"]}
        out = []
        for step in self.checkpoints:
            rec = store.get(keys[step])
            meta = {"step": step, "train_losses": rec["train_losses"], "train_source": rec["train_source"],
                    "cost": rec["cost"]}
            for b, texts in zip(behaviours, rec["texts"]):
                out += [wb.completion(b, self.name, f"step{step}", [{"role": "user", "content": b.full_prompt}], t, k,
                                      meta) for k, t in enumerate(texts)]
        return out
