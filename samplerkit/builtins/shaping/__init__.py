"""Built-in truncation and shaping plugin (typical_p, epsilon/eta cutoffs, xtc, ...)."""

from samplerkit.builtins.shaping.cutoffs import EpsilonCutoff, EtaCutoff
from samplerkit.builtins.shaping.dynamic_temperature import DynamicTemperature
from samplerkit.builtins.shaping.smoothing import Smoothing
from samplerkit.builtins.shaping.tfs import TailFree
from samplerkit.builtins.shaping.top_a import TopA
from samplerkit.builtins.shaping.top_n_sigma import TopNSigma
from samplerkit.builtins.shaping.typical import TypicalP
from samplerkit.builtins.shaping.xtc import Xtc
from samplerkit.hookspecs import hookimpl

BUILTIN_SHAPING: list[type] = [TypicalP, EpsilonCutoff, EtaCutoff, TopA, TailFree, TopNSigma, DynamicTemperature,
                               Smoothing, Xtc]


@hookimpl
def register_processors():
    return list(BUILTIN_SHAPING)
