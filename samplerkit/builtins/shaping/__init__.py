"""Built-in shaping plugin: steps that reshape the distribution (rescale logits) without
removing tokens: temperature, dynamic temperature, smoothing."""

from samplerkit.builtins.shaping.dynamic_temperature import DynamicTemperature
from samplerkit.builtins.shaping.smoothing import Smoothing
from samplerkit.builtins.shaping.temperature import Temperature
from samplerkit.hookspecs import hookimpl

BUILTIN_SHAPING: list[type] = [Temperature, DynamicTemperature, Smoothing]


@hookimpl
def register_processors():
    return list(BUILTIN_SHAPING)
