"""``repbend models`` (the embedded models and where specs resolve) and ``repbend chat`` (one generation)."""
from __future__ import annotations

import time
from typing import Optional

import typer


def models_cmd(
    prepare: bool = typer.Option(False, "--prepare",
                                 help="Fetch and convert now (once) instead of on first use: the embedded model SPEC "
                                      "names, or all of them when SPEC is not given."),
    verify: bool = typer.Option(False, "--verify",
                                help="Re-hash every file of the converted model(s) against the manifest."),
    spec: Optional[str] = typer.Argument(None, help="Also show where this model spec (alias, folder or hub id) resolves."),
) -> None:
    """List the embedded models (aliases, source packages, GGUF sha256 and size, licence, caveat, cache status).

    Any command that takes --model accepts these aliases, a local transformers folder, a PEFT adapter folder
    (its base is read from adapter_config.json) or a Hugging Face hub id."""
    from repbend.errors import RepbendError
    from repbend.models import resolve_model
    from repbend.models.embedded import EMBEDDED, BY_NAME, cache_status, ensure_model

    extra = resolve_model(spec) if spec else None  # bad specs fail before any work
    if prepare or verify:
        if extra is not None and extra.kind != "alias":
            raise RepbendError(f"--prepare/--verify work on embedded models; {spec!r} is a {extra.kind}. "
                               f"Give an alias ({', '.join(m.name for m in EMBEDDED)}) or none for all.")
        for m in [BY_NAME[extra.alias]] if extra else EMBEDDED:
            t0 = time.perf_counter()
            ensure_model(m, verify=verify)
            typer.echo(f"{m.name} ready at {m.folder} ({time.perf_counter() - t0:.1f} s)", err=True)
    for m in EMBEDDED:
        typer.echo(f"{m.name}  [{cache_status(m)}]  aliases: {', '.join(m.aliases)}")
        typer.echo(f"    {m.title}; parameters: {m.params}")
        typer.echo(f"    packages: {m.packages}")
        typer.echo(f"    GGUF: {m.gguf_size / 1e6:.1f} MB, sha256 {m.gguf_sha256}")
        typer.echo(f"    licence: {m.licence}")
        typer.echo(f"    caveat: {m.caveat}")
        typer.echo(f"    -> {m.folder}")
    if extra:
        typer.echo(extra.describe())


def chat_cmd(
    prompt: str = typer.Argument(..., help="The user message."),
    model: str = typer.Option("default", "--model", "-m", help="Alias, local folder, adapter folder or hub id."),
    adapter: Optional[str] = typer.Option(None, "--adapter", "-a", help="PEFT adapter folder to put on the model."),
    system: Optional[str] = typer.Option(None, "--system", "-s",
                                         help="System prompt (default: the chat template's own, if it has one)."),
    prefill: str = typer.Option("", "--prefill", help="Force the answer to start with this text (printed too)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1, help="Most tokens to generate."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.7, "--temperature", min=1e-4, help="Sampling temperature (with --sample)."),
    top_p: float = typer.Option(0.9, "--top-p", min=1e-6, max=1.0, help="Nucleus sampling mass (with --sample)."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or auto (default: cuda if present)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)."),
    fallback_template: bool = typer.Option(False, "--fallback-template",
                                           help="Use repbend's plain '### User:' template if the tokenizer has none."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow custom model code from the hub."),
) -> None:
    """Load a model (and adapter) and print its answer to PROMPT, e.g. repbend chat "How do I bake bread?"."""
    from repbend.models import load_model
    from repbend.models.generation import generate

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    m, tok = load_model(model, adapter, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                        fallback_template=fallback_template)
    t1 = time.perf_counter()
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    (text,), = generate(m, tok, [messages], [prefill], max_new_tokens=max_new_tokens, do_sample=sample,
                        temperature=temperature, top_p=top_p, seed=seed, batch_size=1, progress=False)
    typer.echo(prefill + text)
    typer.echo(f"[loaded in {t1 - t0:.1f} s, generated in {time.perf_counter() - t1:.1f} s]", err=True)


def register(app: typer.Typer) -> None:
    app.command("models")(models_cmd)
    app.command("chat")(chat_cmd)
