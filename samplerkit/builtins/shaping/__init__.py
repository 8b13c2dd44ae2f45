"""Built-in truncation and shaping plugin (typical_p, epsilon/eta cutoffs, xtc, ...)."""

from samplerkit.hookspecs import hookimpl

BUILTIN_SHAPING: list[type] = []


@hookimpl
def register_processors():
    return list(BUILTIN_SHAPING)
