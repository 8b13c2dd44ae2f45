"""``samplerkit --help`` and ``samplerkit VERB --help`` import no torch (several seconds on a
small machine): the verbs' modules import it when they run."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
from samplerkit.cli import COMMANDS, main

for argv in [[c.name, "--help"] for c in COMMANDS] + [["--help"]]:
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code == 0, (argv, exc.code)
    else:
        raise AssertionError(f"{argv} did not exit")
heavy = sorted(m for m in ("torch", "numpy", "transformers", "pydantic") if m in sys.modules)
print("IMPORTED", ",".join(heavy), file=sys.stderr)
"""


def test_help_imports_no_torch():
    # The installed plugins' own modules import torch; block them so the test sees samplerkit's
    # imports only (a plugin verb is listed only when its plugin is loaded).
    plugins = sorted({ep.name for ep in importlib.metadata.entry_points(group="samplerkit")})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "SAMPLERKIT_BLOCK_PLUGINS": ",".join(plugins)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: samplerkit generate" in out.stdout and "usage: samplerkit [-h] COMMAND" in out.stdout
    imported = out.stderr.strip().splitlines()[-1]
    assert imported.startswith("IMPORTED") and "torch" not in imported, imported
