"""Tests of the backend tutorial plugin, run against the *installed* distribution (entry point)."""

from __future__ import annotations

import pytest
import samplerkit_toybackend
import torch
from samplerkit_toybackend import BOS_ID, DEFAULT_TEXT, EOS_ID, TrigramBackend

import samplerkit
from samplerkit import ConfigError
from samplerkit.cli import main as cli_main
from samplerkit.testing import check_backend, check_plugin

TEXT = "the cat sat on the mat. the dog sat on the log."


# -- the contract ------------------------------------------------------------------------

def test_passes_check_backend():
    check_backend(TrigramBackend())
    check_backend(TrigramBackend(TrigramBackend.Params(text=TEXT, smoothing=0.01)))


def test_passes_check_plugin():
    check_plugin(samplerkit_toybackend, "toybackend")


def test_check_backend_catches_a_cache_that_forgets_the_older_token():
    class Forgetful(TrigramBackend):
        """A bug a tutorial reader might write: step keeps only the new token (a bigram)."""

        name = "forgetful"

        def step(self, next_ids):
            self._cache = torch.stack([torch.full_like(next_ids, BOS_ID), next_ids.to(torch.int64)], dim=-1)
            return self._logits(self._cache)

    with pytest.raises(AssertionError, match="KV cache is inconsistent"):
        check_backend(Forgetful())


# -- registration through the entry point ----------------------------------------------

def test_registered_with_distribution_and_version():
    entry = samplerkit.default_registry().entry("backend", "trigram")
    assert entry.cls is TrigramBackend
    assert entry.plugin.describe() == "toybackend (samplerkit-toybackend 0.1.0)"


def test_blocked_by_name(monkeypatch):
    monkeypatch.setenv("SAMPLERKIT_BLOCK_PLUGINS", "toybackend")
    with pytest.raises(ConfigError, match="unknown backend 'trigram'"):
        samplerkit.generate("the ", {"backend": "trigram"}, max_new_tokens=2)


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="smoothing"):
        samplerkit.generate("the ", {"backend": {"name": "trigram", "smoothing": 0}}, max_new_tokens=2)


# -- the model -------------------------------------------------------------------------

def test_probabilities_are_the_smoothed_trigram_counts():
    backend = TrigramBackend(TrigramBackend.Params(text=TEXT, smoothing=0.5))
    probs = backend.prefill([backend.tokenize("the c")]).last.softmax(-1)[0]
    # After "the c" the context is (' ', 'c'): the text follows it by 'a', once. The alphabet is
    # the text's distinct bytes plus EOS: P(a | ' ', 'c') = (1 + s) / (1 + s |A|).
    alphabet = len(set(TEXT.encode())) + 1
    expected = (1 + 0.5) / (1 + 0.5 * alphabet)
    assert float(probs[ord("a")]) == pytest.approx(expected, rel=1e-5)
    assert float(probs[ord("Z")]) == 0.0                       # not in the text: never sampled
    assert float(probs[BOS_ID]) == 0.0


def test_greedy_generation_follows_the_text():
    config = {"backend": {"name": "trigram", "text": TEXT, "smoothing": 0.01}, "sampler": "greedy",
              "generation": {"max_new_tokens": 30}}
    [done] = samplerkit.generate("the d", config)
    full = ("the d" + done.text).encode()
    # Every trigram greedy produced was seen in the text (the counts dominate the smoothing).
    trigrams = {full[i:i + 3] for i in range(3, len(full) - 2)}
    assert trigrams and all(t in TEXT.encode() for t in trigrams), full


def test_end_of_text_stops_a_row():
    config = {"backend": {"name": "trigram", "text": "ab"}, "sampler": "greedy",
              "generation": {"max_new_tokens": 10}}
    [done] = samplerkit.generate("ab", config)
    assert done.text == "" and done.finish_reason == "stop"
    assert EOS_ID in TrigramBackend(TrigramBackend.Params(text="ab")).eos_token_ids


def test_seeded_rows_are_batch_independent_and_fan_out():
    config = {"backend": "trigram", "sampler": {"name": "categorical"}, "generation": {"max_new_tokens": 20}}
    alone = samplerkit.generate(["The c"], config, seeds=[3])
    batch = samplerkit.generate(["A bi", "The c"], config, seeds=[9, 3])
    assert batch[1].text == alone[0].text
    fanned = samplerkit.generate(["The c"], config, seeds=[3], n=3)
    assert len(fanned) == 3 and all(set(c.text.encode()) <= set(DEFAULT_TEXT.encode()) for c in fanned)


def test_cli(capsys):
    assert cli_main(["generate", "--set", "backend=trigram", "--set", "sampler=greedy",
                     "--max-new-tokens", "5", "The "]) == 0
    assert capsys.readouterr().out.strip()
