"""Built-in penalties, bans and biases plugin: one processor family per module."""

from samplerkit.builtins.penalties.allowed_tokens import AllowedTokens
from samplerkit.builtins.penalties.bad_words import BadWords
from samplerkit.builtins.penalties.dry import Dry
from samplerkit.builtins.penalties.frequency_presence import (
    FrequencyPenalty,
    PresencePenalty,
)
from samplerkit.builtins.penalties.logit_bias import LogitBias
from samplerkit.builtins.penalties.min_tokens import MinTokens
from samplerkit.builtins.penalties.no_repeat_ngram import NoRepeatNgram
from samplerkit.builtins.penalties.repetition_penalty import RepetitionPenalty
from samplerkit.hookspecs import hookimpl

BUILTIN_PENALTIES: list[type] = [
    RepetitionPenalty, FrequencyPenalty, PresencePenalty, LogitBias, BadWords, AllowedTokens,
    MinTokens, NoRepeatNgram, Dry,
]

__all__ = ["AllowedTokens", "BUILTIN_PENALTIES", "BadWords", "Dry", "FrequencyPenalty", "LogitBias", "MinTokens",
           "NoRepeatNgram", "PresencePenalty", "RepetitionPenalty", "register_processors"]


@hookimpl
def register_processors():
    return list(BUILTIN_PENALTIES)
