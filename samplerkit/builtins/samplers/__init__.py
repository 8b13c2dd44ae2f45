"""Built-in samplers plugin."""

from samplerkit.builtins.samplers.categorical import Categorical
from samplerkit.builtins.samplers.greedy import Greedy
from samplerkit.hookspecs import hookimpl

BUILTIN_SAMPLERS = [Greedy, Categorical]


@hookimpl
def register_samplers():
    return list(BUILTIN_SAMPLERS)
