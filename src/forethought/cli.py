"""The `forethought` command line. Commands only parse flags and present results; the work lives in
the library, so the CLI, the plots and the viewer all show the same objects."""

from __future__ import annotations

import json
import math
import sys
from typing import Annotated

import typer
from rich.console import Console

from forethought.errors import ForethoughtError

try:  # recent typer vendors its own click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer on real click
    from click.exceptions import ClickException, NoArgsIsHelpError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Run a language model offline with an explicit KV cache and measure what it carries between tokens.",
)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Named model or path to a .gguf file / HF folder.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
DtypeOpt = Annotated[
    str,
    typer.Option("--dtype", help="float32, bfloat16, float16, float64, or int8 (8-bit weights, float32 activations)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]


class _Stdout:
    """Streamed text goes through here, so an error or interruption that stops it mid-line starts its own line
    (the `error:` line must never be glued to the end of the prompt or the generated text)."""

    mid_line = False

    @classmethod
    def write(cls, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            cls.mid_line = not text.endswith("\n")

    @classmethod
    def end_line(cls) -> None:
        if cls.mid_line:
            cls.mid_line = False
            try:
                sys.stdout.write("\n")
                sys.stdout.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more to keep apart
                pass


def load(model: str, device: str, dtype: str, quiet: bool = False):
    from forethought.weights import load_model

    if quiet:
        return load_model(model, device, dtype)
    with err_console.status(f"loading {model} …"):
        return load_model(model, device, dtype)


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
            help="Draft tokens and verify them in one forward (same output): heads, lookup or auto.",
        ),
    ] = None,
    draft_len: Annotated[
        int | None, typer.Option("--draft-len", help="Tokens drafted per forward, 1..15 (--speculative; default 4).")
    ] = None,
    heads: Annotated[
        str | None, typer.Option("--heads", help="Draft heads file (default: the ones shipped for the model).")
    ] = None,
    model: ModelOpt = "smollm2-135m",
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

    check_speculative_flags(speculative, draft_len, heads)
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

        drafter = make_drafter(lm.model, speculative, heads)
    stream = StreamDecoder(lm.tokenizer, skip_special=plain_chat, context=prompt_ids)

    def show(token: int) -> None:
        if not as_json:
            _Stdout.write(stream.push(token))

    if lm.model.device.type == "cpu":
        from forethought.model import kernels

        kernels.module()  # a first-run compile announces itself on stderr now, not inside the streamed text
    lm.model.announce_decode_path()  # likewise a decode path without the compiled step
    if not as_json and not plain_chat:
        _Stdout.write(text)
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
    _Stdout.write("\n")  # the summary goes to stderr: keep it below the text, not inside it
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
def info(model: ModelOpt = "smollm2-135m", as_json: JsonOpt = False) -> None:
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


def _register_commands() -> None:
    import importlib
    import pkgutil

    import forethought.commands as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"forethought.commands.{module.name}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    _register_commands()
    command = typer.main.get_command(app)
    _Stdout.mid_line = False
    try:
        try:
            command.main(args=argv, prog_name="forethought", standalone_mode=False)
        finally:
            _Stdout.end_line()
    except ForethoughtError as e:
        err_console.print(f"error: {e}", markup=False, soft_wrap=True)
        return 2
    except NoArgsIsHelpError as e:
        print(e.ctx.get_help())
        return 0
    except ClickException as e:
        err_console.print(f"error: {e.format_message()}", markup=False, soft_wrap=True)
        return 2
    except typer.Abort:
        err_console.print("aborted", markup=False)
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        return 130
    except FileNotFoundError as e:
        err_console.print(f"error: {e.strerror}: {e.filename}", markup=False, soft_wrap=True)
        return 2
    except OSError as e:  # a write the machine refused (full disk, read-only, permissions) that no check caught
        from forethought.paths import WRITE_ERRNOS, reason

        if e.errno not in WRITE_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        err_console.print(f"error: {where}cannot write: {reason(e)}", markup=False, soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
