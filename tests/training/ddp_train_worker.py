"""Worker for test_training_distributed.py: `torchrun --nproc_per_node 2 ddp_train_worker.py CONFIG OUT`.

Runs repbend.training.train on every rank and saves, per rank, the trained adapter weights and the
loss parts it logged (after averaging across ranks), so the test can compare the ranks.
"""
from __future__ import annotations

import sys

import torch

import repbend.training.trainer as trainer_mod
from repbend.config import load_config
from repbend.training import TrainConfig, train

logged: list[dict] = []
captured: dict = {}
_mean = trainer_mod._mean_across
_save = trainer_mod._save_final


def mean_spy(acc, values):
    out = _mean(acc, values)
    if "loss/total" in out:
        logged.append(dict(out))
    captured["rank"], captured["world"] = acc.process_index, acc.num_processes
    return out


def save_spy(acc, model, unwrapped, tokenizer, run_dir):
    captured["weights"] = {n: p.detach().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
    _save(acc, model, unwrapped, tokenizer, run_dir)


trainer_mod._mean_across = mean_spy
trainer_mod._save_final = save_spy
train(load_config(TrainConfig, sys.argv[1]))
torch.save({"weights": captured["weights"], "logged": logged, "world": captured["world"]},
           f"{sys.argv[2]}/rank{captured['rank']}.pt")
