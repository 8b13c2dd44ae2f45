"""The ``samplerkit`` console script's entry point.

It only imports :mod:`samplerkit.cli` and runs it. The command line's own imports (argparse,
pydantic models, the server's protocol) take a moment, and on a busy machine a Ctrl-C can land
while they run, before :func:`samplerkit.cli.main` could catch it. Here that interrupt, too,
exits 130 without a traceback, like one during a command.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from samplerkit.cli import main as cli_main
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return cli_main()
