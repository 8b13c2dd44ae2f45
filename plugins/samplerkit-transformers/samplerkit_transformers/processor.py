"""A samplerkit pipeline as a transformers ``LogitsProcessor``: the pipeline picks every token of
``model.generate()``.

The trick: the processor does not hand transformers a distribution to sample from. It runs the
whole pipeline itself (processors in order, then the sampler with samplerkit's per-row random
streams) and returns scores that are ``-inf`` everywhere except ``0.0`` at the chosen token.
Whatever transformers does next (softmax + ``torch.multinomial``, or ``argmax``), the only token
with non-zero probability is the pipeline's choice. Why not return processed logits and let
transformers sample?

- Seeds: transformers samples with ``torch.multinomial`` on the global RNG, so a row's draw
  depends on everything else that consumed that RNG and on its batch neighbours. samplerkit
  keys each row's stream by ``(seed, tokens generated)``, so a seeded row is reproducible alone,
  in any batch, and identical to what :class:`samplerkit.Generator` draws.
- The exact distribution: transformers' warpers (temperature, top-k 50 by default, top-p, ...)
  run after user processors. On a one-hot they can change nothing; the neutral settings in
  :data:`NEUTRAL_GENERATE_KWARGS` also switch off the processors transformers would run *before*
  ours (repetition penalty, n-gram blocking, suppressed tokens, ...), so the pipeline sees the
  model's raw logits, as in samplerkit's own decode loop.

The processor keeps a :class:`samplerkit.StepContext` (rows = the generate batch) so history-based
steps (penalties, DRY, mirostat's ``mu``) work: the prompt is ``input_ids[:, :prompt_length]``
without its left padding, the generated tokens are the columns after ``prompt_length``, and
``num_generated`` (the row's random-stream counter) advances once per call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from samplerkit.config import RunConfig
from samplerkit.context import StepContext
from samplerkit.generate import load_config, row_seeds
from samplerkit.pipeline import BoundPipeline, Pipeline, RowOverrides
from samplerkit.registry import Registry

#: ``model.generate`` settings that leave the token choice to the pipeline: sampling on (so
#: ``num_return_sequences`` works) with every transformers warper at its neutral value, and the
#: processors transformers runs before user processors switched off. Keys the installed
#: transformers does not know are dropped by :func:`generate_kwargs`.
NEUTRAL_GENERATE_KWARGS: dict[str, Any] = {
    "do_sample": True, "num_beams": 1,
    # warpers (they run after our processor; neutral anyway, and cheaper when skipped)
    "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None, "typical_p": 1.0, "top_h": None,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    # processors that run before ours and would change the logits the pipeline sees
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "sequence_bias": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "min_length": 0, "min_new_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "exponential_decay_length_penalty": None,
    "guidance_scale": None, "remove_invalid_values": False, "renormalize_logits": False,
    "watermarking_config": None,
}

_NEG_INF = float("-inf")


class SamplerkitLogitsProcessor(LogitsProcessor):
    """Runs a samplerkit pipeline on each step's scores and returns a one-hot (``0`` / ``-inf``)
    at the token it chose.

    Args:
        pipeline: a :class:`samplerkit.Pipeline`, or a config (YAML path, mapping, ``RunConfig``)
            whose ``pipeline`` and ``sampler`` sections are used; a config's pipeline is built
            on the device of the scores.
        prompt_length: width of the (left-padded) ``input_ids`` passed to ``generate``;
            generated tokens are the columns after it.
        seeds: one optional seed per prompt, as ``Generator.generate(seeds=...)``; sample ``j``
            of a prompt seeded ``s`` uses ``row_seed(s, j)``. A prompt without one uses its
            ``rows`` override's sampler seed, else the config's, as in the decode loop.
        rows: optional per-prompt parameter overrides (``{step name: {field: value}}``).
        attention_mask: the prompts' ``[B, prompt_length]`` mask, to strip left padding from
            the prompt history steps read; without it every prompt column counts.
        num_return_sequences: samples per prompt (rows are prompt-major, as in transformers).
        eos_token_ids: end-of-sequence ids for steps that read them (``min_tokens``).
        max_new_tokens: initial width of the generated-token buffer (it grows when exceeded).
        tokenize: text to token ids without special tokens, for steps that take strings
            (``bad_words.words``); :func:`generate_kwargs` passes the ``tokenizer``'s.

    One step on a tiny batch, no model needed: the returned scores are a one-hot at the choice.

    >>> import torch
    >>> proc = SamplerkitLogitsProcessor({"pipeline": [{"top_k": 2}], "sampler": "greedy"}, prompt_length=2)
    >>> proc(torch.tensor([[5, 6]]), torch.tensor([[0.1, 2.0, 1.0, -3.0]]))
    tensor([[-inf, 0., -inf, -inf]])

    Use it with one ``generate`` call at a time; a call with ``input_ids`` as long as the prompt
    starts a new batch, so the processor can be reused. Sampling and greedy search only: assisted
    decoding (several new tokens per call) raises; beam search reorders rows behind the
    processor's back and is not supported.
    """

    def __init__(self, pipeline: Pipeline | str | Path | Mapping[str, Any] | RunConfig, prompt_length: int,
                 seeds: Sequence[int | None] | None = None, *, rows: Sequence[RowOverrides | None] | None = None,
                 attention_mask: torch.Tensor | None = None, num_return_sequences: int = 1,
                 eos_token_ids: Sequence[int] = (), max_new_tokens: int | None = None,
                 tokenize: Callable[[str], list[int]] | None = None, registry: Registry | None = None):
        if prompt_length < 0 or num_return_sequences < 1:
            raise ValueError("prompt_length must be >= 0 and num_return_sequences >= 1")
        self._config: RunConfig | None = None
        if isinstance(pipeline, Pipeline):
            self.pipeline: Pipeline | None = pipeline
        else:                                  # validate now; build on the scores' device later
            self._config = load_config(pipeline, registry)[0]
            self.pipeline = None
        self.prompt_length = prompt_length
        self.seeds = None if seeds is None else list(seeds)
        self.rows = None if rows is None else list(rows)
        self.attention_mask = attention_mask
        self.n = num_return_sequences
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_new_tokens = max_new_tokens
        self.tokenize = tokenize
        self.bound: BoundPipeline | None = None
        self.ctx: StepContext | None = None
        self._last: torch.Tensor | None = None
        self._steps = 0                       # the `t` the next call must have (a host counter: no sync)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t = input_ids.shape[1] - self.prompt_length          # tokens generated so far
        if t == 0:
            self._start(input_ids, scores)
        elif self.ctx is None or t != self._steps or input_ids.shape[0] != self.ctx.batch_size:
            raise RuntimeError(
                f"SamplerkitLogitsProcessor(prompt_length={self.prompt_length}) got input_ids of shape "
                f"{tuple(input_ids.shape)}: it must be called once per generated token, starting with the "
                "prompt, on a constant batch (greedy or sampling; not beam search or assisted decoding)")
        else:
            self._append(input_ids[:, -1])
        ids = self.bound.sample(scores, self.ctx)
        self._last, self._steps = ids, t + 1
        return torch.full_like(scores, _NEG_INF).scatter_(-1, ids.unsqueeze(-1), 0.0)

    # -- batch bookkeeping ------------------------------------------------------------
    def _start(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        batch, n = input_ids.shape[0], self.n
        if batch % n:
            raise ValueError(f"batch of {batch} rows is not a multiple of num_return_sequences={n}")
        prompts = batch // n
        for name, given in (("seeds", self.seeds), ("rows", self.rows)):
            if given is not None and len(given) != prompts:
                raise ValueError(f"{name} has {len(given)} entries for {prompts} prompts; give one per prompt")
        if self._config is not None and (self.pipeline is None or self.pipeline.device != scores.device):
            self.pipeline = Pipeline.from_config(self._config, device=scores.device)
        pipe = self.pipeline
        overrides = None if self.rows is None else [self.rows[i // n] for i in range(batch)]
        self.bound = pipe.bind(overrides if overrides is not None else batch, seeds=self._row_seeds(prompts))
        self.ctx = StepContext(batch, scores.shape[-1], prompt_ids=self._prompt_ids(input_ids),
                               uses=pipe.uses, max_new_tokens=self.max_new_tokens or 64,
                               eos_token_ids=self.eos_token_ids, tokenize=self.tokenize, device=scores.device)

    def _row_seeds(self, prompts: int) -> list[int | None] | None:
        """One seed per row, exactly as the decode loop derives them (:func:`samplerkit.generate.row_seeds`)."""
        return row_seeds(self.pipeline, prompts, self.n, self.seeds, self.rows)

    def _prompt_ids(self, input_ids: torch.Tensor) -> list[list[int]]:
        cols = input_ids[:, :self.prompt_length].cpu()
        if self.attention_mask is None:
            return cols.tolist()
        mask = self.attention_mask.cpu().bool()
        if mask.shape[1] != self.prompt_length:
            raise ValueError(f"attention_mask has {mask.shape[1]} columns, prompt_length is {self.prompt_length}")
        if mask.shape[0] * self.n == cols.shape[0] and self.n > 1:
            mask = mask.repeat_interleave(self.n, dim=0)        # transformers expands prompt-major
        return [row[m].tolist() for row, m in zip(cols, mask)]

    def _append(self, tokens: torch.Tensor) -> None:
        ctx = self.ctx
        # Finished rows get transformers' pad id, which may lie outside the vocabulary; their
        # history no longer matters, so any valid id will do.
        vocab = ctx.vocab_size
        tokens = torch.where((tokens >= 0) & (tokens < vocab), tokens, self._last).to(ctx.device)
        # Every row has generated `_steps - 1` tokens so far (finished rows keep counting).
        if ctx.generated is not None and self._steps - 1 >= ctx.generated.shape[1]:
            ctx.generated = torch.cat([ctx.generated, torch.full_like(ctx.generated, -1)], dim=1)
        ctx.append(tokens)


def generate_kwargs(pipeline: Pipeline | str | Path | Mapping[str, Any] | RunConfig,
                    inputs: Mapping[str, torch.Tensor] | torch.Tensor, *,
                    seeds: Sequence[int | None] | None = None, rows: Sequence[RowOverrides | None] | None = None,
                    num_return_sequences: int = 1, max_new_tokens: int | None = None, model: Any = None,
                    tokenizer: Any = None, registry: Registry | None = None) -> dict[str, Any]:
    """Keyword arguments for ``model.generate(**inputs, **kwargs)`` that make ``pipeline`` choose
    every token: ``logits_processor`` plus :data:`NEUTRAL_GENERATE_KWARGS`.

    ``inputs`` is the tokenizer's output (``input_ids`` and ``attention_mask``, left-padded) or
    an ``input_ids`` tensor. ``model`` supplies the EOS ids for steps that read them (``min_tokens``),
    ``tokenizer`` the tokenization of steps that take strings (``bad_words.words``). With the
    same model, prompts and seeds the tokens equal :class:`samplerkit.Generator`'s.
    """
    from samplerkit_transformers.backend import model_eos_ids

    if isinstance(inputs, torch.Tensor):
        input_ids, mask = inputs, None
    else:
        input_ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    processor = SamplerkitLogitsProcessor(
        pipeline, int(input_ids.shape[1]), seeds, rows=rows, attention_mask=mask,
        num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens, registry=registry,
        eos_token_ids=sorted(model_eos_ids(model)) if model is not None else (),
        tokenize=None if tokenizer is None else (lambda text: list(tokenizer.encode(text, add_special_tokens=False))))
    known = GenerationConfig().to_dict()
    kwargs = {k: v for k, v in NEUTRAL_GENERATE_KWARGS.items() if k in known}
    kwargs["logits_processor"] = LogitsProcessorList([processor])
    if num_return_sequences != 1:
        kwargs["num_return_sequences"] = num_return_sequences
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    return kwargs


__all__ = ["NEUTRAL_GENERATE_KWARGS", "SamplerkitLogitsProcessor", "generate_kwargs"]
