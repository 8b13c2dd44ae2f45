"""``samplerkit explain``: what each stage of a pipeline did to the next-token distribution,
on the real model, for one prompt.

It runs the configured backend and pipeline on the prompt, drawing tokens as ``samplerkit
generate`` does (the same seeds, stop tokens and stop strings), and traces
(:meth:`samplerkit.pipeline.BoundPipeline.trace`) the logits of the step asked for (``--step
K``, default the first generated token) or of every step (``--all-steps``). ``--token TEXT``
follows one token through the stages: its probability at each, and the stage that removed it.

Like :mod:`samplerkit.generate` this module drives a backend and a pipeline itself: tracing
needs the logits and the step context of each step, which the decode loop does not keep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from samplerkit.errors import GenerationError, SamplerkitError

if TYPE_CHECKING:       # the heavy modules (torch) load when the command runs, not when the CLI starts
    from samplerkit.config import RunConfig
    from samplerkit.generate import Generator
    from samplerkit.trace import Trace

#: Most tokens ``--all-steps`` traces when neither the config nor ``--max-new-tokens`` says fewer.
ALL_STEPS_DEFAULT = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", metavar="PROMPT", help="the prompt text")
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML run config")
    parser.add_argument("--preset", metavar="NAME", help="start from a shipped preset (see `samplerkit presets`)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config value, e.g. --set pipeline[1].top_p=0.5 (repeatable)")
    parser.add_argument("--model", help="path to a GGUF file or Hugging Face model directory (sets backend.model)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--seed", type=int, help="sampler seed (sets sampler.seed)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=0, metavar="K",
                       help="explain the K-th generated token (0: the first, the default)")
    which.add_argument("--all-steps", action="store_true",
                       help="explain every step (a summary line per step; --plot draws kept size and entropy)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help=f"with --all-steps: most tokens to generate (default: the config's, at most {ALL_STEPS_DEFAULT})")
    parser.add_argument("--top", type=int, default=5, metavar="N", help="top tokens shown per stage (default 5)")
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--token", metavar="TEXT", help="follow this token (one token of text, e.g. ' Paris') through the stages")
    token.add_argument("--token-id", type=int, metavar="ID", help="follow this token id through the stages")
    parser.add_argument("--plot", metavar="FILE", help="draw the stages to FILE (.png, .svg or .html); needs samplerkit[plot]")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


@dataclass
class Explained:
    """A traced generation: per step, the trace (``None`` for steps not asked for) and the token drawn."""

    prompt: str
    prompt_ids: list[int]
    tokens: list[int]
    texts: list[str]
    traces: list[Trace | None]
    seed: int | None
    seed_chosen: bool
    finish_reason: str


def _config(args: argparse.Namespace) -> tuple[RunConfig, Any]:
    """The run config from --config, --preset and --set (with --model/--seed/--chat), as
    ``samplerkit generate`` builds it."""
    from samplerkit.config import command_line_data, resolve_unblocked

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"backend.model={json.dumps(args.model)}")
    if args.seed is not None:
        overrides.append(f"sampler.seed={args.seed}")
    if args.chat:
        overrides.append("generation.chat=true")
    return resolve_unblocked(command_line_data(args.config, overrides, args.preset)[1], args.config)


def explain(generator: Generator, prompt: str, *, steps: int, traced: set[int] | None, top: int = 5,
            seed: int | None = None) -> Explained:
    """Generate up to ``steps`` tokens for ``prompt`` and trace the steps in ``traced`` (every
    step when ``None``). The tokens are drawn by the bound pipeline from the traced logits, with
    the seeds ``generate`` would use (``seed`` for an unseeded config; one is chosen at random
    when the pipeline draws and none is given, and reported)."""
    from samplerkit.context import StepContext
    from samplerkit.detokenize import IncrementalDetokenizer, StopMatcher
    from samplerkit.generate import row_seeds

    backend, pipeline, gen = generator.backend, generator.pipeline, generator.config.generation
    text = backend.apply_chat_template(prompt) if gen.chat else prompt
    prompt_ids = backend.tokenize(text, add_special=True)
    if not prompt_ids:
        raise GenerationError("the prompt is empty and the model adds no BOS token; give at least one character")
    limit = backend.max_context
    if limit is not None:
        steps = min(steps, limit - len(prompt_ids))
        if steps <= 0:
            raise GenerationError(f"the prompt has {len(prompt_ids)} tokens, but the model's context holds {limit}")
    seeds = row_seeds(pipeline, 1, 1, None if seed is None else [seed])
    chosen = False
    if seeds is None and pipeline.takes_seed:
        seed, chosen = secrets.randbelow(2**62), True
        seeds = row_seeds(pipeline, 1, 1, [seed])
    bound = pipeline.bind(1, seeds=seeds)
    logits = backend.prefill([prompt_ids]).last
    ctx = StepContext(1, logits.shape[-1], prompt_ids=[prompt_ids], uses=pipeline.uses, max_new_tokens=steps,
                      eos_token_ids=[*backend.eos_token_ids, *gen.stop_token_ids],
                      tokenize=lambda t: backend.tokenize(t, add_special=False),
                      token_vocabulary=backend.token_vocabulary, device=logits.device)
    stop_ids = (set() if gen.ignore_eos else set(backend.eos_token_ids)) | set(gen.stop_token_ids)
    detok, stops = IncrementalDetokenizer(backend.detokenize, prompt_ids), StopMatcher(gen.stop)
    tokens: list[int] = []
    traces: list[Trace | None] = []
    finish = "length"
    for k in range(steps):
        traces.append(bound.trace(logits, ctx, top=top) if traced is None or k in traced else None)
        ids = bound.sample(logits, ctx)
        ctx.append(ids)
        token = int(ids[0])
        tokens.append(token)
        if token in stop_ids:
            finish = "stop"
            break
        if stops.feed(detok.push(token))[1]:
            finish = "stop"
            break
        if traced is not None and k >= max(traced):
            break
        logits = backend.step(ids)
    texts = [backend.detokenize([t]) for t in tokens]
    return Explained(text, prompt_ids, tokens, texts, traces, seed if seeds is not None else None, chosen, finish)


def _follow(trace: Trace, token: int, decode) -> dict[str, Any]:
    """The token's probability at each stage and the stage that removed it."""
    removed = trace.removed_by(token)
    return {"id": token, "text": decode(token),
            "p": [{"stage": s.name, "p": float(s.probs()[0, token])} for s in trace.stages],
            "removed_by": None if removed is None else {"stage": removed.name, "location": removed.location,
                                                        "plugin": removed.plugin}}


def _follow_line(followed: dict[str, Any]) -> str:
    steps = " -> ".join(f"{e['stage']} {e['p']:.4f}" for e in followed["p"]
                        if followed["removed_by"] is None or e["p"] > 0 or e["stage"] == followed["removed_by"]["stage"])
    who = followed["removed_by"]
    verdict = "kept to the end: it can be drawn" if who is None else (
        f"removed by {who['location']}" + (f", plugin {who['plugin']}" if who["plugin"] else ""))
    return f"token {followed['text']!r} (id {followed['id']}): p {steps}; {verdict}"


def _token_id(args: argparse.Namespace, generator: Generator) -> int | None:
    backend = generator.backend
    if args.token_id is not None:
        if not 0 <= args.token_id < backend.vocab_size:
            raise SamplerkitError(f"--token-id {args.token_id} is outside the vocabulary [0, {backend.vocab_size})")
        return args.token_id
    if args.token is None:
        return None
    ids = backend.tokenize(args.token, add_special=False)
    if len(ids) != 1:
        parts = ", ".join(f"{backend.detokenize([i])!r} (id {i})" for i in ids) or "nothing"
        raise SamplerkitError(f"--token {args.token!r} is {len(ids)} tokens for this model ({parts}), not one; "
                              f"give one of them (e.g. --token-id {ids[0] if ids else 0})")
    return ids[0]


def run(args: argparse.Namespace) -> int:
    if args.step < 0:
        raise SamplerkitError(f"--step must be >= 0 (0 is the first generated token), got {args.step}")
    if args.top < 1:
        raise SamplerkitError(f"--top must be >= 1, got {args.top}")
    if args.max_new_tokens is not None and (args.max_new_tokens < 1 or not args.all_steps):
        raise SamplerkitError("--max-new-tokens must be >= 1" if args.max_new_tokens < 1 else
                              "--max-new-tokens goes with --all-steps (--step K generates K + 1 tokens)")
    if args.plot is not None:
        from samplerkit.plot import check_path

        check_path(args.plot)                  # before the model loads
    from samplerkit.generate import Generator

    config, registry = _config(args)
    if config.segments:
        # One traced pipeline per run: the first segment's (the row's first tokens run it).
        first = config.segments[0]
        print(f"samplerkit explain: note: the config has {len(config.segments)} segment(s); explain traces the first "
              f"one's pipeline ({first.location}) at every step and does not switch segments", file=sys.stderr)
        config = dataclasses.replace(config, processors=first.processors, sampler=first.sampler, segments=())
    generator = Generator(config, registry=registry)
    follow = _token_id(args, generator)
    decode = generator.backend.detokenize
    if config.generation.n > 1:
        print(f"samplerkit explain: note: generation.n is {config.generation.n}; explain traces one sample",
              file=sys.stderr)
    if args.all_steps:
        steps = args.max_new_tokens or min(config.generation.max_new_tokens, ALL_STEPS_DEFAULT)
        if steps < 1:
            raise SamplerkitError("generation.max_new_tokens is 0: there is no step to explain; "
                                  "pass --max-new-tokens N")
        result = explain(generator, args.prompt, steps=steps, traced=None, top=args.top)
    else:
        limit = config.generation.max_new_tokens
        if args.step >= limit:
            # `generate` would never draw token K: explaining it would trace a step no run takes.
            drawn = f"tokens 0 to {limit - 1}; choose --step {limit - 1} or less, or" if limit else "no token;"
            raise SamplerkitError(f"--step {args.step} is past generation.max_new_tokens ({limit}): the run draws "
                                  f"{drawn} raise it with --set generation.max_new_tokens={args.step + 1}")
        result = explain(generator, args.prompt, steps=args.step + 1, traced={args.step}, top=args.top)
        if len(result.tokens) <= args.step:
            raise SamplerkitError(f"the generation ended after {len(result.tokens)} tokens ({result.finish_reason}), "
                                  f"so there is no step {args.step}; choose --step {len(result.tokens) - 1} or less")
    shown = [k for k, t in enumerate(result.traces) if t is not None]
    one = lambda t: decode([t])          # noqa: E731 - the token-text callback of Trace and plot
    if args.json:
        print(json.dumps(_as_json(result, shown, one, follow, config), ensure_ascii=False))
    else:
        _print(result, shown, one, follow, config, args)
    if args.plot is not None:
        sys.stdout.flush()                      # the tables before the plot's note on stderr
        _plot(result, shown, one, args)
    return 0


def _as_json(result: Explained, shown: list[int], decode, follow: int | None, config: RunConfig) -> dict[str, Any]:
    return {"prompt": result.prompt, "prompt_tokens": len(result.prompt_ids), "seed": result.seed,
            "pipeline": [s.location for s in config.processors] + [f"sampler {config.sampler.name}"],
            "tokens": [{"id": t, "text": x} for t, x in zip(result.tokens, result.texts)],
            "finish_reason": result.finish_reason,
            "steps": [{"step": k, "token": {"id": result.tokens[k], "text": result.texts[k]},
                       "stages": result.traces[k].rows(0, decode),
                       **({"follow": _follow(result.traces[k], follow, decode)} if follow is not None else {})}
                      for k in shown]}


def _print(result: Explained, shown: list[int], decode, follow: int | None, config: RunConfig, args) -> None:
    out = sys.stdout
    chain = " -> ".join(s.name for s in config.processors) or "(no processors)"
    out.write(f"prompt: {result.prompt!r} ({len(result.prompt_ids)} tokens)\npipeline: {chain} => {config.sampler.name}\n")
    if result.seed_chosen:
        out.write(f"seed: {result.seed} (the config has none; pass --seed {result.seed} to draw the same tokens)\n")
    out.write(f"generated: {''.join(result.texts)!r}\n")
    if args.all_steps:
        names = result.traces[0].names
        header = ["step", "token", *names]
        rows = [[str(k), repr(result.texts[k]),
                 *(f"{int(s.kept[0])} H={float(s.entropy[0]):.2f}" for s in result.traces[k].stages)] for k in shown]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        out.write("kept tokens and entropy H (nats) after each stage, per generated token:\n")
        for r in [header, *rows]:
            out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
        if follow is not None:
            for k in shown:
                out.write(f"step {k}: {_follow_line(_follow(result.traces[k], follow, decode))}\n")
        return
    k = shown[0]
    trace = result.traces[k]
    out.write(f"\nstep {k}: drew {result.texts[k]!r} (id {result.tokens[k]})\n")
    out.write(trace.table(0, decode) + "\n")
    if follow is not None:
        out.write(_follow_line(_follow(trace, follow, decode)) + "\n")


def _plot(result: Explained, shown: list[int], decode, args) -> None:
    from samplerkit.plot import save, step_figure, steps_figure

    if args.all_steps:
        fig = steps_figure([result.traces[k] for k in shown], [result.texts[k] for k in shown],
                           title=f"{result.prompt!r}: kept tokens and entropy per stage")
    else:
        k = shown[0]
        fig = step_figure(result.traces[k], decode, drawn=result.tokens[k],
                          title=f"{result.prompt!r}, step {k}: drew {result.texts[k]!r}")
    path = save(fig, args.plot)
    print(f"plot: {path}", file=sys.stderr)


__all__ = ["ALL_STEPS_DEFAULT", "Explained", "add_arguments", "explain", "run"]
