"""Built-in penalties, bans and biases plugin (repetition/frequency/presence penalties, ...)."""

from samplerkit.hookspecs import hookimpl

BUILTIN_PENALTIES: list[type] = []


@hookimpl
def register_processors():
    return list(BUILTIN_PENALTIES)
