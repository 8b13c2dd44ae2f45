"""Built-in backends plugin: ``bigram`` (deterministic, no files) and ``llama`` (real models)."""

from samplerkit.builtins.backends.bigram import BigramBackend
from samplerkit.hookspecs import hookimpl


@hookimpl
def register_backends():
    # The llama package imports its heavy dependencies (gguf, tokenizers) lazily.
    from samplerkit.builtins.backends.llama import LlamaBackend

    return [BigramBackend, LlamaBackend]
