"""The training loop on a tiny random Llama: LoRA/full FT, resume equality, divergence, bad input, merge."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import repbend.training.trainer as trainer_mod
from repbend.config import apply_overrides
from repbend.errors import ConfigError, DivergenceError, RepbendError
from repbend.methods import METHODS
from repbend.training import train
from repbend.training.config import TrainConfig
from train_fixtures import built_dir, make_rows, tiny_train_config, write_built  # noqa: F401 (fixture)


def _metrics(run):
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_lora_trains_adapter_only_and_saves_loadable_folder(tiny_model_dir, built_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    captured = {}
    real = trainer_mod._save_final

    def spy(acc, model, unwrapped, tokenizer, run_dir):
        captured["model"] = unwrapped
        real(acc, model, unwrapped, tokenizer, run_dir)

    monkeypatch.setattr(trainer_mod, "_save_final", spy)
    base_before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    run = train(tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run", max_steps=3))
    trained = captured["model"]
    lora_b = {n: p for n, p in trained.named_parameters() if "lora_B" in n}
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b.values())  # LoRA B starts at 0: it moved
    for name, p in trained.get_base_model().named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p.detach(), base_before[key]), name
    # adapters only on blocks 0..max(target)=0..3 (all 4 blocks of the tiny model) and loadable by peft
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, run)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(loaded(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits)
    rows = _metrics(run)
    assert len(rows) == 3 and {"loss/total", "loss/safe", "loss/unsafe", "loss/cos", "loss/kl"} <= set(rows[0])
    assert (run / "loss.png").stat().st_size > 1000 and (run / "layers.csv").is_file()
    info = json.loads((run / "run_info.json").read_text())
    assert info["status"] == "finished" and info["steps"] == 3 and (run / "config.yaml").is_file()
    assert (run / "tokenizer_config.json").is_file()


def test_merge_gives_plain_model_with_same_logits(tiny_model_dir, built_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from repbend.training import merge

    run = train(tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run", max_steps=2, layer_stats_every=0))
    out = merge(run, tmp_path / "merged")
    import repbend.training

    assert repbend.training.merge is merge   # the function; its module once shadowed it after the first call
    merged = AutoModelForCausalLM.from_pretrained(out)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-5)


def test_gguf_converted_folder_can_be_merged_and_fully_finetuned(tiny_model_dir, built_dir, tmp_path):
    """A GGUF -> safetensors folder (plain tensors, config.json still naming GGUF, as the default model's
    conversion used to write it) loaded as GGUF-quantised and refused save_pretrained."""
    converted = tmp_path / "converted"
    shutil.copytree(tiny_model_dir, converted)
    cfg = json.loads((converted / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gguf", "gguf_file": "model.gguf", "dequantize": False}
    (converted / "config.json").write_text(json.dumps(cfg))
    from repbend.training import merge

    run = train(tiny_train_config(converted, built_dir, tmp_path / "lora", max_steps=1, layer_stats_every=0))
    out = merge(run, tmp_path / "merged")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    data = tiny_train_config(converted, built_dir, tmp_path / "full", max_steps=1, layer_stats_every=0).model_dump()
    del data["lora"]
    full = train(TrainConfig.model_validate({**data, "full_finetune": True}))
    assert (full / "model.safetensors").is_file()


class _Stop(Exception):
    pass


def test_resume_ends_with_same_weights(tiny_model_dir, built_dir, tmp_path, monkeypatch):
    kw = dict(max_steps=5, save_every=2, layer_stats_every=0)
    full = train(tiny_train_config(tiny_model_dir, built_dir, tmp_path / "full", **kw))
    real = trainer_mod.save_checkpoint

    def crash_after_save(*a, **k):
        real(*a, **k)
        raise _Stop()

    monkeypatch.setattr(trainer_mod, "save_checkpoint", crash_after_save)
    cfg = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "resumed", **kw)
    with pytest.raises(_Stop):
        train(cfg)
    monkeypatch.setattr(trainer_mod, "save_checkpoint", real)
    with pytest.raises(RepbendError, match="--resume"):
        train(cfg)  # a second fresh start into the same folder is refused
    resumed = train(cfg, resume=True)
    a, b = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    la, lb = _metrics(full), _metrics(resumed)
    assert [r["step"] for r in lb] == ["1", "2", "3", "4", "5"]
    assert [float(r["loss/total"]) for r in la] == pytest.approx([float(r["loss/total"]) for r in lb], rel=1e-6)


def test_resume_refuses_a_changed_config(tiny_model_dir, built_dir, tmp_path, monkeypatch):
    cfg = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run", max_steps=2, save_every=1, layer_stats_every=0)
    train(cfg)
    changed = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"r": 8})})
    monkeypatch.setattr("repbend.models.load_model", _no_load)
    with pytest.raises(RepbendError, match="lora"):
        train(changed, resume=True)


def test_divergence_stops_and_keeps_last_good_checkpoint(tiny_model_dir, built_dir, tmp_path):
    cfg = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run", max_steps=6, save_every=1,
                            layer_stats_every=0, lr=0.5)
    cfg.method.params = {**cfg.method.params, "max_unsafe_ratio": 1e-3, "beta": 5.0}
    with pytest.raises(DivergenceError, match=r"max_unsafe_ratio.*last good checkpoint is .*step-00000\d"):
        train(cfg)
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts and (ckpts[-1] / "DONE").is_file() and (ckpts[-1] / "adapter" / "adapter_config.json").is_file()


def _no_load(*a, **k):
    raise AssertionError("the model must not be loaded before the input is checked")


def test_bad_input_fails_before_loading_the_model(tiny_model_dir, built_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("repbend.models.load_model", _no_load)
    cfg = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "a")
    cfg.method.params = {**cfg.method.params, "target_layers": [2, 7]}
    with pytest.raises(ConfigError, match=r"method.target_layers.*out of range 0..4"):
        train(cfg)
    no_unsafe = write_built(tmp_path / "safe-only", make_rows(unsafe=False))
    with pytest.raises(RepbendError, match="no 'unsafe' rows"):
        train(tiny_train_config(tiny_model_dir, no_unsafe, tmp_path / "b"))
    data = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "c").model_dump()
    data["lora"]["layers_to_transform"] = [9]
    with pytest.raises(ConfigError, match="lora.layers_to_transform"):
        train(TrainConfig.model_validate(data))
    with pytest.raises(ValueError, match="full_finetune"):
        TrainConfig.model_validate({**data, "full_finetune": True})
    # `lora=null` drops the section, so a LoRA config file can be switched to full fine-tuning from the CLI
    ft = TrainConfig.model_validate(apply_overrides(data, ["lora=null", "full_finetune=true"]))
    assert ft.full_finetune and "lora" not in ft.model_fields_set
    with pytest.raises(ValueError, match="repeat count must be >= 1"):
        TrainConfig.model_validate({**data, "data": {**data["data"], "repeat_kinds": {"benign": 0}}})
    typo = {**data, "lora": {**data["lora"], "layers_to_transform": None},
            "data": {**data["data"], "repeat_kinds": {"overrefusl": 3}}}
    with pytest.raises(RepbendError, match=r"repeat_kinds names kind\(s\) \['overrefusl'\]"):
        train(TrainConfig.model_validate(typo))
    with pytest.raises(ValueError, match="full_finetune"):
        TrainConfig.model_validate({**{k: v for k, v in data.items() if k != "lora"}, "full_finetune": True,
                                    "model": {"name": str(tiny_model_dir), "adapter": str(tmp_path)}})


def test_full_finetune_uses_a_frozen_copy(tiny_model_dir, built_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run", max_steps=2, lr=1e-3,
                             layer_stats_every=1).model_dump()
    del data["lora"]
    run = train(TrainConfig.model_validate({**data, "full_finetune": True}))
    trained = AutoModelForCausalLM.from_pretrained(run)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert any(".layers.0." in n for n in changed) and not any("embed_tokens" in n for n in changed)
    steps = {r["step"] for r in csv.DictReader((run / "layers.csv").open())}
    assert steps == {"1", "2"}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_trains_without_trainer_changes(name, tiny_model_dir, built_dir, tmp_path):
    cfg = tiny_train_config(tiny_model_dir, built_dir, tmp_path / name, max_steps=2, layer_stats_every=1)
    # only layer choices are adapted to the 4-block model; everything else is the method's default
    params = {"repbend": {"target_layers": [2, 3]}, "circuit_breakers": {"target_layers": [2, 3]},
              "rmu": {"layer": 3}, "npo": {"delta": 0.1}}.get(name, {})
    cfg = TrainConfig.model_validate({**cfg.model_dump(), "method": {"name": name, "params": params}})
    run = train(cfg)
    rows = _metrics(run)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(float(r["loss/total"]))) for r in rows)


def test_default_model_token_options_train_end_to_end(tiny_model_dir, built_dir, tmp_path):
    """The default-model config's token choices (request+response bent, safe responses pinned, shared
    template prefix skipped) go through the real trainer and log how many unsafe tokens were bent."""
    cfg = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run", max_steps=2)
    cfg.method.params.update(token_mode="request_response", safe_token_mode="response_all",
                             unsafe_skip_shared_prefix=True)
    run = train(cfg)
    rows = _metrics(run)
    assert len(rows) == 2 and all(float(r["unsafe_tokens"]) > 0 for r in rows)
    assert all(torch.isfinite(torch.tensor(float(r["loss/total"]))) for r in rows)
    # off by default: without the option the count is not logged
    full = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "full", max_steps=1)
    full.method.params.update(token_mode="request_response", safe_token_mode="response_all")
    assert "unsafe_tokens" not in _metrics(train(full))[0]


def _last_request_states(model_dir, rows, layers):
    """Hidden states at each row's last request token, computed directly from a saved model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from repbend.data.chat import encode

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    out = {l: [] for l in layers}
    with torch.no_grad():
        for r in rows:
            e = encode(tok, r["messages"], r.get("response"), max_request_tokens=32, max_response_tokens=24)
            hs = model(torch.tensor([e.input_ids]), output_hidden_states=True).hidden_states
            for l in layers:
                out[l].append(hs[l][0, e.request_len - 1])
    return {l: torch.stack(v) for l, v in out.items()}


def test_direction_term_uses_the_original_models_states_and_bends_along_them(tiny_model_dir, built_dir, tmp_path,
                                                                             monkeypatch):
    """zeta > 0 through the real trainer: prepare() gets the frozen model's states (its direction equals one
    computed by hand from the base model: harmful minus benign, refusal rows left out), L_dir is logged, and the
    trained model's last-request states of the harmful rows lie further along that direction."""
    from repbend.methods.repbend import RepBend

    seen = {}
    real = RepBend.prepare

    def spy(self, reference_states):
        real(self, reference_states)
        seen["directions"] = self.directions

    monkeypatch.setattr(RepBend, "prepare", spy)
    data = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run", max_steps=6, lr=1e-3).model_dump()
    del data["lora"]
    data["method"]["params"].update(alpha=1.0, beta=0.0, gamma=0.0, zeta=1.0, direction_margin=None)
    run = train(TrainConfig.model_validate({**data, "full_finetune": True}))
    rows = make_rows()
    harmful = [r for r in rows if r["kind"] == "harmful"]
    benign = [r for r in rows if r["split"] == "safe" and r["kind"] == "benign"]
    base_h, base_b = (_last_request_states(tiny_model_dir, rs, [2, 3]) for rs in (harmful, benign))
    for l in (2, 3):
        d = base_h[l].mean(0) - base_b[l].mean(0)
        assert torch.allclose(seen["directions"][l], d / d.norm(), atol=1e-5)
    metrics = _metrics(run)
    assert len(metrics) == 6 and all("loss/dir" in r for r in metrics)
    trained_h = _last_request_states(run, harmful, [2, 3])
    for l in (2, 3):
        d = seen["directions"][l]
        moved = float(((trained_h[l] - base_h[l]) @ d).mean())
        assert moved > 0.1 * float(base_h[l].norm(dim=-1).mean())


def test_row_shifts_move_only_the_selected_rows_from_that_block_on(tiny_model):
    from repbend.training.forward import row_shifts

    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    shift = torch.randn(tiny_model.config.hidden_size)
    with torch.no_grad():
        plain = tiny_model(input_ids=ids, output_hidden_states=True).hidden_states
        with row_shifts(tiny_model, [(slice(1, 2), {2: shift})]):
            moved = tiny_model(input_ids=ids, output_hidden_states=True).hidden_states
        again = tiny_model(input_ids=ids, output_hidden_states=True).hidden_states
    for l in (0, 1, 2):
        torch.testing.assert_close(moved[l], plain[l])            # up to the hooked block's own recorded state
    assert not torch.allclose(moved[3][1], plain[3][1])           # the shifted row, from the next block on
    torch.testing.assert_close(moved[3][[0, 2]], plain[3][[0, 2]])  # the other rows untouched
    torch.testing.assert_close(again[4], plain[4])                # hooks removed
    with pytest.raises(RepbendError, match="out of range"):
        with row_shifts(tiny_model, [(slice(0, 1), {4: shift})]):
            pass


def test_shifted_rows_pick_a_share_of_rows_by_their_tokens_alone():
    from repbend.training.forward import shifted_rows

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (400, 6), generator=g)
    mask = torch.ones_like(ids)
    assert shifted_rows(ids, mask, slice(0, 400), 1.0) == slice(0, 400)
    half = shifted_rows(ids, mask, slice(0, 400), 0.5)
    assert 160 <= len(half) <= 240 and all(0 <= i < 400 for i in half)
    quarter = set(shifted_rows(ids, mask, slice(0, 400), 0.25))
    assert quarter < set(half) and 60 <= len(quarter) <= 140           # nested: a row under 0.25 is under 0.5
    assert shifted_rows(ids, mask, slice(0, 400), 0.5) == half         # deterministic
    # a row's pick depends on its own non-padding tokens only: other rows, its position and padding do not matter
    padded = torch.cat([torch.zeros(400, 3, dtype=ids.dtype), ids], 1)
    pmask = torch.cat([torch.zeros(400, 3, dtype=mask.dtype), mask], 1)
    assert shifted_rows(padded, pmask, slice(0, 400), 0.5) == half
    sub = [i - 100 for i in half if 100 <= i < 200]
    assert shifted_rows(ids[100:200], mask[100:200], slice(0, 100), 0.5) == sub
    assert [i for i in shifted_rows(ids, mask, slice(100, 200), 0.5)] == [i for i in half if 100 <= i < 200]


def test_steer_fraction_steers_the_same_part_of_the_unsafe_rows_in_both_passes(tiny_model_dir, built_dir, tmp_path,
                                                                              monkeypatch):
    """steer_fraction 0.5: the reference and policy passes of a step steer the same subset of the unsafe rows (rows
    2..3 of the batch), the hooks get exactly that subset, and over the run some unsafe rows are steered, some not."""
    import repbend.training.forward as fwd

    picks, hooked = [], []
    real_pick, real_shift = fwd.shifted_rows, fwd.row_shifts

    def pick(ids, mask, rows, fraction):
        out = real_pick(ids, mask, rows, fraction)
        picks.append((fraction, rows, out))
        return out

    def spy(model, shifts):
        hooked.append([rows for rows, _ in shifts])
        return real_shift(model, shifts)

    monkeypatch.setattr(fwd, "shifted_rows", pick)
    monkeypatch.setattr(fwd, "row_shifts", spy)
    data = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run", max_steps=6, lr=1e-3).model_dump()
    del data["lora"]
    data["method"]["params"].update(steer_state=1, steer_coefficient=4.0, steer_fraction=0.5)
    train(TrainConfig.model_validate({**data, "full_finetune": True}))
    assert len(picks) == 12 and all(f == 0.5 and rows == slice(2, 4) for f, rows, _ in picks)   # 6 steps x 2 passes
    chosen = [out for _, _, out in picks]
    assert all(chosen[k] == chosen[k + 1] for k in range(0, 12, 2))      # reference and policy agree within a step
    assert all(set(c) <= {2, 3} for c in chosen)
    n = sum(len(c) for c in chosen[::2])
    assert 0 < n < 12                                                     # some of the 12 unsafe rows, not all
    assert [h[0] for h in hooked if h] == [c for c in chosen if c]        # the hooks shift exactly the picked rows


def test_steer_state_trains_on_steered_unsafe_rows_in_both_passes(tiny_model_dir, built_dir, tmp_path, monkeypatch):
    """Every training forward pass (policy and reference) steers exactly the unsafe rows at state 1; with full
    fine-tuning the first step's policy equals the reference, so L_unsafe is exactly 0 at step 1 (a one-sided steer
    would already show), and later steps bend."""
    import repbend.training.forward as fwd

    seen = []
    real = fwd.row_shifts

    def spy(model, shifts):
        seen.append([(rows, sorted(by)) for rows, by in shifts])
        return real(model, shifts)

    monkeypatch.setattr(fwd, "row_shifts", spy)
    data = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "run", max_steps=4, lr=1e-3).model_dump()
    del data["lora"]
    data["method"]["params"].update(steer_state=1, steer_coefficient=4.0)
    run = train(TrainConfig.model_validate({**data, "full_finetune": True}))
    rows = _metrics(run)
    assert float(rows[0]["loss/unsafe"]) == 0.0 and float(rows[-1]["loss/unsafe"]) > 0.0
    steered = [call for call in seen if call]
    # 4 steps x (reference + policy) + the telemetry/eval passes never steer; batch order safe, unsafe, retain -> rows 2..3
    assert len(steered) >= 8 and all(call == [(slice(2, 4), [1])] for call in steered)


def _refusal_nll(model_dir, rows):
    """Mean next-token NLL of each row's response given its request, from a saved model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from repbend.data.chat import encode

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    total, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            e = encode(tok, r["messages"], r["response"], max_request_tokens=32, max_response_tokens=24)
            ids = torch.tensor([e.input_ids])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            tgt = ids[0, 1:]
            resp = torch.arange(1, ids.shape[1]) >= e.request_len
            total += float(-logp[torch.arange(len(tgt)), tgt][resp].sum())
            n += int(resp.sum())
    return total / n


@pytest.mark.parametrize("split", ["safe", "pair"])
def test_nll_term_teaches_the_safe_rows_refusals(split, tiny_model_dir, built_dir, tmp_path):
    """nu > 0 through the real trainer, on the safe rows or on each unsafe row's paired refusal: L_NLL is logged and
    the trained model gives the refusals to the harmful requests a clearly lower NLL than both the base model and the
    same run without nu."""
    data = tiny_train_config(tiny_model_dir, built_dir, tmp_path / "nll", max_steps=10, lr=3e-3).model_dump()
    del data["lora"]
    data["method"]["params"].update(alpha=0.1, beta=0.1, gamma=0.1, epsilon=0.1, nu=1.0, nll_split=split)
    run = train(TrainConfig.model_validate({**data, "full_finetune": True}))
    metrics = _metrics(run)
    assert len(metrics) == 10 and all(float(r["loss/nll"]) > 0 for r in metrics)
    data["method"]["params"]["nu"] = 0.0
    data["output_dir"] = str(tmp_path / "plain")
    plain = train(TrainConfig.model_validate({**data, "full_finetune": True}))
    assert "loss/nll" not in _metrics(plain)[0]
    refusals = [r for r in make_rows() if r["kind"] == "refusal"]
    taught, untaught, base = (_refusal_nll(d, refusals) for d in (run, plain, tiny_model_dir))
    assert taught < base - 0.25 and taught < untaught - 0.25, (taught, untaught, base)
