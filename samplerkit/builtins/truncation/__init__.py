"""Built-in truncation plugin: steps that remove tokens (set their logits to ``-inf``) and leave
the survivors' logits as they are. One family per module."""

from samplerkit.builtins.truncation.cutoffs import EpsilonCutoff, EtaCutoff
from samplerkit.builtins.truncation.min_p import MinP
from samplerkit.builtins.truncation.tfs import TailFree
from samplerkit.builtins.truncation.top_a import TopA
from samplerkit.builtins.truncation.top_k import TopK
from samplerkit.builtins.truncation.top_n_sigma import TopNSigma
from samplerkit.builtins.truncation.top_p import TopP
from samplerkit.builtins.truncation.typical import TypicalP
from samplerkit.builtins.truncation.xtc import Xtc
from samplerkit.hookspecs import hookimpl

BUILTIN_TRUNCATION: list[type] = [TopK, TopP, MinP, TypicalP, EpsilonCutoff, EtaCutoff, TopA, TailFree, TopNSigma, Xtc]


@hookimpl
def register_processors():
    return list(BUILTIN_TRUNCATION)
