"""`forethought generate` and `forethought info`: the model itself, before any measurement."""

from __future__ import annotations

import json
import math
from typing import Annotated

import typer

from forethought.commands.common import (
    DEFAULT_MODEL,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    Stdout,
    app,
    console,
    err_console,
    load,
)
from forethought.errors import ForethoughtError


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    n: Annotated[int, typer.Option("-n", "--max-new-tokens", help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k", help="Keep the k likeliest tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Keep the smallest set with this mass (1 = off).")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Same seed, same text.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the whole prefix at every step.")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    show_template: Annotated[
        bool, typer.Option("--show-template", help="With --chat: print the templated prompt and its markers too.")
    ] = False,
    speculative: Annotated[
        str | None,
        typer.Option(
            "--speculative",
            help="Draft tokens and verify them in one forward (same output): heads, lookup, model or auto.",
        ),
    ] = None,
    draft_len: Annotated[
        int | None, typer.Option("--draft-len", help="Tokens drafted per forward, 1..15 (--speculative; default 4).")
    ] = None,
    heads: Annotated[
        str | None, typer.Option("--heads", help="Draft heads file (default: the ones shipped for the model).")
    ] = None,
    draft_model: Annotated[
        str | None,
        typer.Option(
            "--draft-model",
            help="Model that drafts for --speculative model/auto (same vocabulary; default: the registry's, "
            "e.g. qwen2.5-coder-0.5b for qwen2.5-coder-1.5b).",
        ),
    ] = None,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
) -> None:
    """Continue PROMPT, streaming tokens as they are chosen."""
    from forethought.model.generate import check_prompt
    from forethought.model.generate import generate as run_generation
    from forethought.model.sampling import SamplingParams
    from forethought.weights.tokenizer import StreamDecoder

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if not prompt:
        raise ForethoughtError("the prompt is empty: give at least one token of text")
    if n < 0:
        raise ForethoughtError(f"-n must be >= 0, got {n}")
    if speculative is not None and no_cache:
        raise ForethoughtError("--speculative verifies drafts on the KV cache: drop --no-cache")
    from forethought.model.speculative import check_speculative_flags

    check_speculative_flags(speculative, draft_len, heads, draft_model)
    draft_len = 4 if draft_len is None else draft_len
    lm = load(model, device, dtype, quiet=as_json)
    text = lm.tokenizer.apply_chat_template(prompt) if chat else prompt
    prompt_ids = lm.tokenizer.encode(text)
    check_prompt(lm.model, prompt_ids, n)  # before anything is printed
    # A chat shows the assistant's answer; its template's <|im_start|>/<|im_end|> only with --show-template.
    plain_chat = chat and not show_template
    drafter = None
    if speculative is not None:
        from forethought.model.speculative import make_drafter
        from forethought.weights.registry import load_draft_model

        draft = None
        if speculative in ("model", "auto"):
            draft = load_draft_model(lm, draft_model, required=speculative == "model")
            if draft is not None and not as_json:
                err_console.print(f"[dim]drafting with {draft.name} ({draft.describe()['weights']})[/dim]")
        drafter = make_drafter(lm.model, speculative, heads, draft.model if draft is not None else None)
    stream = StreamDecoder(lm.tokenizer, skip_special=plain_chat, context=prompt_ids)

    def show(token: int) -> None:
        if not as_json:
            Stdout.write(stream.push(token))

    if lm.model.device.type == "cpu":
        from forethought.model import kernels

        kernels.module()  # a first-run compile announces itself on stderr now, not inside the streamed text
    lm.model.announce_decode_path()  # likewise a decode path without the compiled step
    if not as_json and not plain_chat:
        Stdout.write(text)
    stops = (lm.tokenizer.eos_id,) if lm.tokenizer.eos_id is not None else ()
    result = run_generation(
        lm.model,
        prompt_ids,
        n,
        params,
        use_cache=not no_cache,
        stop_ids=stops,
        on_token=show,
        speculative=drafter,
        draft_len=draft_len,
    )
    new_text = lm.tokenizer.decode(result.new_ids, skip_special=True)
    summary = {
        "model": lm.name,
        "prompt": text,
        "prompt_ids": result.prompt_ids,
        "new_ids": result.new_ids,
        "text": new_text,
        "stop_reason": result.stop_reason,
        "cache": not no_cache,
        "prefill_seconds": result.prefill_seconds,
        # None, not NaN (which is not JSON), when no decode step ran (-n 0 or 1, or EOS at once)
        "decode_tokens_per_second": rate if math.isfinite(rate := result.decode_tokens_per_second) else None,
        "kv_cache_bytes": result.cache.nbytes if result.cache is not None else 0,
    }
    if result.speculative is not None:
        from forethought.model.speculative import plain_step_seconds

        # The speedup is against plain decode steps timed now, on the same cache and machine state.
        plain = plain_step_seconds(lm.model, result.cache)
        summary["speculative"] = result.speculative.as_dict() | {
            "plain_tokens_per_second": 1 / plain,
            "speedup": None
            if summary["decode_tokens_per_second"] is None
            else summary["decode_tokens_per_second"] * plain,
        }
    if as_json:
        print(json.dumps(summary))
        return
    Stdout.write("\n")  # the summary goes to stderr: keep it below the text, not inside it
    cache_note = f"KV cache {summary['kv_cache_bytes'] / 1e6:.2f} MB" if not no_cache else "no cache (recompute)"
    speed = f"{rate:.1f} tok/s · " if summary["decode_tokens_per_second"] is not None else ""
    err_console.print(
        f"[dim]{len(result.new_ids)} tokens · {speed}"
        f"prefill {len(prompt_ids)} tokens in {result.prefill_seconds * 1e3:.0f} ms · {cache_note} · "
        f"stop: {result.stop_reason}[/dim]",
        soft_wrap=True,
    )
    if result.speculative is not None:
        spec = summary["speculative"]
        err_console.print(
            f"[dim]speculative ({spec['drafter']}, up to {draft_len} drafted): "
            f"{spec['tokens_per_forward']:.2f} tokens per forward, {spec['acceptance_rate']:.0%} of drafts accepted, "
            + (f"{spec['speedup']:.2f}x plain decode " if spec["speedup"] is not None else "")
            + f"({spec['plain_tokens_per_second']:.1f} tok/s plain, measured now)[/dim]",
            soft_wrap=True,
        )


@app.command()
def info(model: ModelOpt = DEFAULT_MODEL, as_json: JsonOpt = False) -> None:
    """Show a model's architecture, size and tokenizer."""
    lm = load(model, "cpu", "float32", quiet=as_json)
    described = lm.describe() | {"n_params": lm.config.n_params(), "load_seconds": round(lm.load_seconds, 2)}
    if as_json:
        print(json.dumps(described, default=str))
        return
    for key, value in described.items():
        if key == "config":
            for k, v in value.items():
                console.print(f"  {k:<16} {v}")
        else:
            console.print(f"{key:<18} {value}")
