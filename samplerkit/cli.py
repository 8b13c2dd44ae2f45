"""The ``samplerkit`` command: generate, batch, plugins, validate, presets, schema, export.

User errors (bad config, unknown names, missing model) print one clear message on stderr
and exit with status 2; no tracebacks (``SAMPLERKIT_DEBUG=1`` shows them).
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from samplerkit import compare, explain, lint, verify
from samplerkit.errors import SamplerkitError
from samplerkit.serve import command as serve_command

EXIT_USER_ERROR = 2


def _generate_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text (several prompts run as one batch)")
    _config_args(g)
    g.add_argument("--preset", metavar="NAME", help="start from a shipped preset (see `samplerkit presets`); "
                                                     "the config file and --set override it")
    g.add_argument("--model", help="path to a GGUF file or Hugging Face model directory (sets backend.model)")
    g.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    g.add_argument("--messages", metavar="FILE.json", help="chat conversation(s) from a JSON file: a list of "
                   "{role, content} messages, or a list of such lists; implies --chat")
    g.add_argument("--seed", type=int, help="sampler seed (sets sampler.seed)")
    g.add_argument("--max-new-tokens", type=int, help="sets generation.max_new_tokens")
    g.add_argument("-n", type=int, help="samples per prompt (sets generation.n)")
    g.add_argument("--json-schema", metavar="FILE.json", help="constrain the output to JSON valid under this "
                   "JSON Schema (puts a json_schema step first in the pipeline; docs/structured.md)")
    g.add_argument("--regex", metavar="PATTERN", help="constrain the output to match this regular expression "
                   "(puts a regex step first in the pipeline)")
    g.add_argument("--json", action="store_true", help="print one JSON object per completion instead of streaming text")
    g.add_argument("--no-stream", action="store_true", help="print each completion when it is finished")


def _plugins_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--block", action="append", default=[], metavar="PLUGIN", help="do not load this plugin")


def _validate_args(v: argparse.ArgumentParser) -> None:
    v.add_argument("config_file", metavar="FILE")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")


def _batch_args(b: argparse.ArgumentParser) -> None:
    _config_args(b)
    b.add_argument("--preset", metavar="NAME", help="start from a shipped preset (see `samplerkit presets`)")
    b.add_argument("--model", help="path to a GGUF file or Hugging Face model directory (sets backend.model)")
    b.add_argument("--input", "-i", required=True, metavar="FILE", help="JSONL input, one request per line")
    b.add_argument("--output", "-o", required=True, metavar="FILE", help="JSONL results, appended; read on start to resume")
    b.add_argument("--errors", metavar="FILE", help="JSONL of rejected lines (default: OUTPUT.errors.jsonl)")
    b.add_argument("--batch-size", type=int, default=16, metavar="N", help="most rows (prompts x n) running at once (default 16)")
    b.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run the batches on Ray Data actors; ADDRESS of a cluster, or none for RAY_ADDRESS / a local Ray")
    b.add_argument("--ray-workers", type=int, metavar="N", help="with --ray: most actors, each loading the model once (default: one per CPU)")


def _export_args(x: argparse.ArgumentParser) -> None:
    x.add_argument("target", choices=["llamacpp"], help="the engine to export to")
    x.add_argument("config_file", nargs="?", metavar="CONFIG", help="YAML run config (optional with --preset)")
    x.add_argument("--preset", metavar="NAME", help="start from a shipped preset (see `samplerkit presets`)")
    x.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value (repeatable)")


def _schema_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--block", action="append", default=[], metavar="PLUGIN", help="do not load this plugin")


def _parser(plugin_commands: bool = True) -> argparse.ArgumentParser:
    """The parser: every verb of :data:`COMMANDS`, then those plugins add (``register_commands``).

    Building it imports no torch (the verbs' modules import it when they run), so ``--help``
    is quick; the plugins' verbs need their modules loaded, which :func:`_main` skips when the
    command line names a built-in verb."""
    parser = argparse.ArgumentParser(prog="samplerkit", description="Sampling pipelines for LLM text generation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        sub_parser = sub.add_parser(command.name, help=command.help, description=command.description)
        command.arguments(sub_parser)
        sub_parser.set_defaults(run=command.run)
    if plugin_commands:
        _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub) -> None:
    """Let each installed plugin add verbs. A plugin that fails here (it raised, or it reused a
    verb) is reported on stderr and left out; the other verbs keep working."""
    from samplerkit.plugins import make_plugin_manager

    try:
        plugins = make_plugin_manager(builtins=False)      # built-ins add no verbs (and import torch)
    except SamplerkitError as exc:
        print(f"samplerkit: warning: plugin commands are not available: {exc}", file=sys.stderr)
        return
    for impl in plugins.manager.hook.register_commands.get_hookimpls():
        info = plugins.info.get(impl.plugin_name)
        who = info.describe() if info is not None else impl.plugin_name
        before = set(sub.choices)
        try:
            impl.function(subparsers=sub)
        except Exception as exc:
            # Take back the parsers it added before failing (argparse has no public removal).
            added = set(sub.choices) - before
            for name in added:
                del sub.choices[name]
            sub._choices_actions[:] = [a for a in sub._choices_actions if a.dest not in added]
            print(f"samplerkit: warning: plugin {who} failed in register_commands(): {type(exc).__name__}: {exc}; "
                  f"its commands are left out (block it with SAMPLERKIT_BLOCK_PLUGINS={impl.plugin_name})",
                  file=sys.stderr)
    for name, choice in sub.choices.items():
        if choice.get_default("run") is None:
            choice.set_defaults(run=_missing_run(name))


def _missing_run(name: str):
    def run(args: argparse.Namespace) -> int:
        raise SamplerkitError(f"the plugin command {name!r} set no handler: its register_commands() must call "
                              f"parser.set_defaults(run=function) on the parser it adds")
    return run


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML run config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config value, e.g. --set sampler.seed=3 or --set pipeline[1].top_p=0.5 (repeatable)")


def _build_config_data(config_file: str | None, overrides: Sequence[str], preset: str | None = None) -> tuple[dict[str, Any], str | None]:
    from samplerkit.config import command_line_data

    return command_line_data(config_file, overrides, preset)[1], config_file


def _resolve(data: dict[str, Any], source: str | None, extra_block: Sequence[str] = ()):
    from samplerkit.config import resolve_unblocked

    return resolve_unblocked(data, source, extra_block)


def cmd_generate(args: argparse.Namespace) -> int:
    from samplerkit.generate import Generator

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"backend.model={json.dumps(args.model)}")
    if args.seed is not None:
        overrides.append(f"sampler.seed={args.seed}")
    if args.max_new_tokens is not None:
        overrides.append(f"generation.max_new_tokens={args.max_new_tokens}")
    if args.n is not None:
        overrides.append(f"generation.n={args.n}")
    if args.chat or args.messages:
        overrides.append("generation.chat=true")
    args.prompts = [*args.prompts, *_read_messages(args.messages)] if args.messages else list(args.prompts)
    if not args.prompts:
        raise SamplerkitError("give at least one PROMPT (or --messages FILE.json)")
    data, source = _build_config_data(args.config, overrides, args.preset)
    data = _with_constraints(data, args)
    config, registry = _resolve(data, source)
    generator = Generator(config, registry=registry)
    n_rows = len(args.prompts) * config.generation.n
    if args.json:
        for completion in generator.generate(args.prompts):
            print(json.dumps(asdict(completion), ensure_ascii=False))
        return 0
    # Several completions are shown after their prompt (to tell them apart), except in chat mode
    # (the reply alone). One streamed completion is the generated text only: the prompt is on
    # the command line already, and glued to the text it would read as part of the output.
    echo_prompt = not config.generation.chat
    if n_rows == 1 and not args.no_stream:
        for delta in generator.stream(args.prompts):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for completion in generator.generate(args.prompts):
        header = f"--- prompt {completion.prompt_index}"
        if config.generation.n > 1:
            header += f", sample {completion.sample_index}"
        print(f"{header} (finish: {completion.finish_reason})")
        print((completion.prompt if echo_prompt else "") + completion.text)
    return 0


def _with_constraints(data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``--json-schema`` / ``--regex``: the constraint steps first in the pipeline (a constraint
    goes before temperature and truncation: a truncation first could leave no allowed token)."""
    from samplerkit.config import DEFAULT_PIPELINE

    steps = []
    if args.json_schema:
        # A command-line path is relative to the working directory, not to --config's directory.
        steps.append({"json_schema": {"file": os.path.abspath(os.path.expanduser(args.json_schema))}})
    if args.regex:
        steps.append({"regex": {"pattern": args.regex}})
    if not steps:
        return data
    pipeline = data.get("pipeline", [dict(s) for s in DEFAULT_PIPELINE])
    if not isinstance(pipeline, list):     # resolve() reports the malformed pipeline
        return data
    return {**data, "pipeline": [*steps, *pipeline]}


def _read_messages(path: str) -> list[Any]:
    """--messages: the conversations of a JSON file (one conversation, or a list of them)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SamplerkitError(f"--messages {path}: cannot read a JSON file: {e}") from None
    if isinstance(data, list) and data and all(isinstance(m, dict) for m in data):
        return [data]                       # one conversation
    if not isinstance(data, list) or not data:
        raise SamplerkitError(f"--messages {path}: expected a list of {{role, content}} messages or a list of such "
                              f"lists, got {type(data).__name__}")
    return data


def cmd_batch(args: argparse.Namespace) -> int:
    from samplerkit.batch import local_executor, run_batch

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"backend.model={json.dumps(args.model)}")
    data, source = _build_config_data(args.config, overrides, args.preset)
    config, registry = _resolve(data, source)
    if args.ray is not None:
        from samplerkit.batch_ray import ray_executor
        executor = ray_executor(config, address=args.ray or None, workers=args.ray_workers)
    else:
        executor = local_executor(config, registry)
    try:
        summary = run_batch(config, args.input, args.output, errors_path=args.errors, batch_size=args.batch_size,
                            executor=executor)
    except KeyboardInterrupt:
        print("\ninterrupted; finished batches are saved: rerun the same command to resume", file=sys.stderr)
        return 130
    if summary.duplicates:
        print(f"batch: removed {summary.duplicates} duplicated rows from {args.output} (an (id, sample) written more "
              f"than once, e.g. by two jobs at once before the output was locked); the first of each was kept",
              file=sys.stderr)
    line = (f"batch: {summary.lines} lines, {summary.rows_written} rows written, {summary.skipped} lines already done, "
            f"{summary.errors} errors")
    print(line + (f" (see {summary.errors_path})" if summary.errors else ""), file=sys.stderr)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from samplerkit.registry import KINDS, default_registry

    registry = default_registry(args.block)
    if args.json:
        out = {kind: [{"name": e.name, "plugin": e.plugin.name, "distribution": e.plugin.distribution,
                       "version": e.plugin.version, "parameters": e.cls.Params.describe_fields()}
                      for e in registry.entries(kind)] for kind in KINDS}
        out["failed"] = dict(registry.failed)
        print(json.dumps(out, indent=2, default=str))
        return 0
    for kind in KINDS:
        print(f"{kind}s:")
        for entry in registry.entries(kind):
            doc = (entry.cls.__doc__ or "").strip().split("\n", 1)[0]
            print(f"  {entry.name}  [{entry.plugin.describe()}]")
            if doc:
                print(f"      {doc}")
            for f in entry.cls.Params.describe_fields():
                rng = f" ({f['constraints']})" if f["constraints"] else ""
                default = repr(f["default"])
                default = default if len(default) <= 40 else default[:37] + "..."
                print(f"      {f['name']}: {f['type']} = {default}{rng}  {f['description']}")
        print()
    for why in registry.failed.values():
        print(f"failed to load: {why}", file=sys.stderr)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from samplerkit.config import command_line_data
    from samplerkit.pipeline import Pipeline

    document, data = command_line_data(args.config_file, args.overrides)
    config, _ = _resolve(data, args.config_file)
    print(f"{args.config_file}: ok")
    print(f"  backend: {config.backend.name}")
    print(f"  pipeline: {Pipeline.from_config(config).describe()}")
    for seg in config.segments:
        bounds = "".join(f", {k}: {v!r}" for k, v in (("until", seg.until), ("max_tokens", seg.max_tokens)) if v is not None)
        print(f"  {seg.location}: {Pipeline(seg.processors, seg.sampler).describe()}{bounds}")
    for warning in lint.lint_config(config, document=document):
        print(f"  warning: {warning}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from samplerkit.pipeline import Pipeline
    from samplerkit.presets import describe_preset, list_presets, load_preset

    for name in list_presets():
        print(f"{name}  {describe_preset(name)}")
        try:
            config, _ = _resolve(load_preset(name), f"preset {name}")
            print(f"    {Pipeline.from_config(config).describe()}")
        except SamplerkitError as exc:            # e.g. a step's plugin is blocked
            print(f"    (unavailable: {exc})")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from samplerkit.registry import default_registry
    from samplerkit.schema import run_config_schema

    print(json.dumps(run_config_schema(default_registry(args.block)), indent=2, default=str))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from samplerkit.export import export_llamacpp

    data, source = _build_config_data(args.config_file, args.overrides, args.preset)
    config, _ = _resolve(data, source)
    exported = export_llamacpp(config)
    for note in exported.notes:
        print(f"note: {note}", file=sys.stderr)
    print(exported.command_line())
    return 0


@dataclass(frozen=True)
class Command:
    """One verb of the ``samplerkit`` command: its arguments and the function that runs it."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    description: str | None = None


#: Every built-in verb, in the order ``samplerkit --help`` lists them (plugins add theirs after,
#: through the ``register_commands`` hook).
COMMANDS: tuple[Command, ...] = (
    Command("generate", "generate text for one or more prompts", cmd_generate, _generate_args,
            "Generate text. Without --config: the default model with the seed's pipeline "
            "(temperature 0.6 -> top_p 0.9, categorical)."),
    Command("plugins", "list processors, samplers and backends with their parameters", cmd_plugins, _plugins_args),
    Command("validate", "check a config file without running it", cmd_validate, _validate_args),
    Command("batch", "run a JSONL file of prompts to a JSONL file of results (resumable)", cmd_batch, _batch_args,
            "Generate for every line of a JSONL file ({\"id\": ..., \"prompt\": ...} per line; see docs/cli.md). "
            "Rerunning the same command skips ids already in the output."),
    Command("presets", "list the shipped presets with their pipelines", cmd_presets),
    Command("export", "print the equivalent flags of another engine (llama.cpp)", cmd_export, _export_args,
            "Print llama.cpp flags (--samplers, values, --seed, -n) equivalent to a config; steps llama.cpp "
            "cannot express are listed in one error (exit 2)."),
    Command("serve", "serve an OpenAI-compatible HTTP API; each request may bring its own pipeline", serve_command.run,
            serve_command.add_arguments),
    Command("schema", "print the JSON Schema of the run config (plugins included)", cmd_schema, _schema_args),
    Command("lint", "warn about steps that do nothing, odd orders and other legal surprises", lint.run, lint.add_arguments),
    Command("verify", "test statistically that a pipeline draws the distribution it claims", verify.run, verify.add_arguments),
    Command("explain", "show what each pipeline stage did to the next-token distribution", explain.run, explain.add_arguments),
    Command("compare", "run two configs on the same prompts with common random numbers", compare.run,
            compare.add_arguments, "Compare two configs: first divergence, token agreement and, along A's text, "
            "the total-variation distance per step (see docs/compare.md)."),
)

# Arguments that name files: passed to open() as they are (a file name need not be UTF-8).
_PATH_ARGUMENTS = {"config", "config_file", "config_a", "config_b", "input", "output", "errors", "model", "plot",
                   "json_schema"}


def _check_text_arguments(args: argparse.Namespace) -> None:
    """Refuse text arguments (prompts, --set values, names) that are not valid UTF-8.

    Python hands undecodable argv bytes over as lone surrogates (surrogateescape: byte ``0xff``
    becomes ``U+DCFF``), which no tokenizer can encode; say which argument and which byte."""
    for dest, value in vars(args).items():
        if dest in _PATH_ARGUMENTS or dest == "run":
            continue
        for index, item in enumerate(value if isinstance(value, list) else [value]):
            if not isinstance(item, str):
                continue
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                bad = item[exc.start]
                byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
                names = {"prompts": f"PROMPT {index + 1}", "overrides": f"--set number {index + 1}"}
                where = names.get(dest, f"--{dest.replace('_', '-')}")
                raise SamplerkitError(f"{where} is not valid UTF-8 text ({byte} at character {exc.start + 1} of "
                                      f"{item.encode('utf-8', 'surrogateescape')!r}); samplerkit reads arguments as "
                                      f"UTF-8: fix the encoding of your terminal or script") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0 done, 1 an I/O failure (disk full),
    2 a user error (also argparse's usage errors, via SystemExit), 130 interrupted (Ctrl-C)."""
    # A file name need not be UTF-8 (argv's undecodable bytes arrive as lone surrogates): echoed in
    # a message it shows as the byte, `\xff`, instead of failing the command with a traceback.
    streams = [(stream, stream.errors) for stream in (sys.stdout, sys.stderr)
               if hasattr(stream, "reconfigure") and getattr(stream, "errors", None) in ("strict", "backslashreplace")]
    for stream, _ in streams:
        stream.reconfigure(errors=_ESCAPE_BYTES)
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown
        for stream, errors in streams:
            stream.reconfigure(errors=errors)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line for a command-line user (``samplerkit: warning: ...``), without the
    source file and line of code that Python's default format shows."""
    print(f"samplerkit: warning: {message}", file=file or sys.stderr)


def _escape_undecodable(exc: UnicodeError) -> tuple[str, int]:
    """Error handler: a surrogate-escaped byte (U+DC80..U+DCFF) as ``\\xNN``, other unencodable
    characters as ``\\uNNNN``."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    text = exc.object[exc.start:exc.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}"
                   for c in text), exc.end


_ESCAPE_BYTES = "samplerkit-escape-bytes"
codecs.register_error(_ESCAPE_BYTES, _escape_undecodable)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    # A built-in verb needs no plugin loaded to parse its arguments (`samplerkit generate --help`
    # stays free of the plugins' imports); another word may be a plugin's verb.
    args = _parser(plugin_commands=verb not in {c.name for c in COMMANDS}).parse_args(argv)
    try:
        _check_text_arguments(args)
        return args.run(args)
    except SamplerkitError as exc:
        if os.environ.get("SAMPLERKIT_DEBUG"):
            raise
        print(f"samplerkit {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_USER_ERROR)
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
