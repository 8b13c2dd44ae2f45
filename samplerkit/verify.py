"""The ``samplerkit verify`` command (the library is :mod:`samplerkit.testing.verification`,
imported only when the command runs: the CLI starts without torch)."""

from __future__ import annotations

import argparse

#: Draws per case by default (samplerkit.testing.verification.DRAWS).
DEFAULT_DRAWS = 50_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config_file", nargs="?", metavar="CONFIG", help="YAML run config (optional with --preset)")
    parser.add_argument("--preset", metavar="NAME", help="start from a shipped preset (see `samplerkit presets`)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config value (repeatable)")
    parser.add_argument("--draws", type=int, default=DEFAULT_DRAWS, metavar="N",
                        help=f"draws per case (default {DEFAULT_DRAWS:,}; fewer weakens the test)")
    parser.add_argument("--seed", type=int, default=0, help="fixes every draw, so a report reproduces (default 0)")
    parser.add_argument("--no-model", action="store_true",
                        help="leave out the default model's logits (no model file needed)")
    parser.add_argument("--case", action="append", default=[], metavar="NAME", dest="cases",
                        help="verify only this case of the corpus (repeatable; e.g. --case ties)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """0 when every case passes, 1 when one fails (2 for a usage or config error, as always)."""
    import json

    from samplerkit.errors import SamplerkitError, did_you_mean
    from samplerkit.lint import load_config
    from samplerkit.pipeline import Pipeline
    from samplerkit.testing.verification import corpus, verify

    if not args.config_file and not args.preset:
        raise SamplerkitError("give a CONFIG file or --preset NAME")
    if args.draws < 1:
        raise SamplerkitError(f"--draws must be at least 1, got {args.draws}")
    _, config = load_config(args.config_file, args.overrides, args.preset)
    if config.segments:            # one pipeline is verified: the segments' would go unchecked in silence
        from samplerkit.errors import ConfigError, ConfigIssue

        raise ConfigError(ConfigIssue("segments", "verify checks one pipeline; this config has segments: verify each "
                                                  "segment's pipeline as a config of its own"), args.config_file)
    cases = corpus(model=not args.no_model, seed=args.seed)
    if args.cases:
        names = [c.name for c in cases]
        unknown = [n for n in args.cases if n not in names]
        if unknown:
            raise SamplerkitError(f"--case {unknown[0]!r}: no such case{did_you_mean(unknown[0], names)} "
                                  f"Cases: {', '.join(repr(n) for n in names)}")
        cases = [c for c in cases if c.name in args.cases]
    report = verify(Pipeline.from_config(config), cases, draws=args.draws, seed=args.seed)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report)
    return 0 if report.passed else 1
