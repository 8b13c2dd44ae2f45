"""Built-in processors plugin: one processor family per module."""

from samplerkit.builtins.processors.min_p import MinP
from samplerkit.builtins.processors.temperature import Temperature
from samplerkit.builtins.processors.top_k import TopK
from samplerkit.builtins.processors.top_p import TopP
from samplerkit.hookspecs import hookimpl

BUILTIN_PROCESSORS = [Temperature, TopK, TopP, MinP]


@hookimpl
def register_processors():
    return list(BUILTIN_PROCESSORS)
