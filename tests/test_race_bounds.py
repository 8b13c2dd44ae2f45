"""The block stage of the race decided from block maxima and kept counts
(``samplerkit.ops.random._race_kept_blocks_by_maxima``) picks the block that the full masking
pass picks, and the samplers' tokens through it equal sampling the truncated logits."""

from __future__ import annotations

import pytest
import torch

import samplerkit
from samplerkit.context import StepContext
from samplerkit.ops.random import (
    _BLOCK_STREAM,
    RACE_BLOCK,
    _race_kept_blocks,
    _race_kept_blocks_by_maxima,
    _stream_keys,
    race_sample,
    row_keys,
)
from samplerkit.ops.truncation import block_maxima, exp_weights, safe_top


def _rows(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Peaked (Zipf-like), flat and spread rows, all-equal rows and mostly -inf rows."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(rows, vocab, generator=g) * torch.linspace(0.3, 3, rows).unsqueeze(-1)
    zipf = -torch.arange(1, vocab + 1, dtype=torch.float32).log()
    x = torch.where(torch.arange(rows).unsqueeze(-1) % 2 == 0,
                    zipf[torch.stack([torch.randperm(vocab, generator=g) for _ in range(rows)])], flat)
    x[5::11] = 0.0
    x[7::11] = x[7::11].masked_fill(torch.rand(len(x[7::11]), vocab, generator=g) < 0.97, float("-inf"))
    return x


@pytest.mark.parametrize("vocab", [RACE_BLOCK * 200, RACE_BLOCK * 150 + 77])
@pytest.mark.parametrize("divisor", [None, 0.7, 2.5])
def test_block_stage_from_maxima_equals_the_full_masking_pass(vocab, divisor):
    """Every row it decides gets the full computation's block, with the threshold on the
    sampled logits or on a source they are a monotone map of (temperature after the cut);
    shallow and deep cuts; both the maxima-only and the count bounds decide rows."""
    rows = 96
    source = _rows(rows, vocab, vocab)
    logits = source if divisor is None else source / divisor
    g = torch.Generator().manual_seed(1)
    depth = torch.rand(rows, 1, generator=g) * torch.tensor([0.5, 3.0, 5.0, 12.0]).repeat(rows // 4).unsqueeze(-1)
    threshold = source.amax(-1, keepdim=True) - depth
    top = safe_top(logits)
    keys = _stream_keys(row_keys(torch.arange(rows) * 13 + 1, torch.full((rows,), 4)), _BLOCK_STREAM)
    full = _race_kept_blocks(source, exp_weights(logits, top), threshold, keys)
    maxima = block_maxima(source, RACE_BLOCK)
    for given in (False, True):
        block, undecided = _race_kept_blocks_by_maxima(
            logits, source, threshold, top, keys,
            compared_max=maxima if given else None,
            value_max=(block_maxima(logits, RACE_BLOCK) if given else None))
        if not given and divisor is not None:
            assert block is None                  # a source cut without maxima: not attempted
            continue
        assert block is not None
        decided = torch.ones(rows, dtype=torch.bool) if undecided is None else ~undecided
        assert int(decided.sum()) >= rows // 2
        assert torch.equal(block[decided], full[decided])


def test_each_bound_decides_rows_the_other_does_not(monkeypatch):
    """Peaked rows are decided from block maxima alone, flat rows need the counts: both
    tiers run and agree with the full pass."""
    import samplerkit.ops.random as random_ops
    calls = []
    original = random_ops._certify_blocks

    def spy(*args, **kwargs):
        block, decided = original(*args, **kwargs)
        calls.append(int(decided.sum()))
        return block, decided

    monkeypatch.setattr(random_ops, "_certify_blocks", spy)
    rows, vocab = 32, RACE_BLOCK * 100
    x = _rows(rows, vocab, 3)[:, :vocab]
    x[5::11], x[7::11] = x[4::11][: len(x[5::11])], x[6::11][: len(x[7::11])]
    threshold = x.amax(-1, keepdim=True) + torch.tensor(0.05).log()
    keys = _stream_keys(row_keys(torch.arange(rows), torch.zeros(rows, dtype=torch.int64)), _BLOCK_STREAM)
    top = safe_top(x)
    block, undecided = _race_kept_blocks_by_maxima(x, x, threshold, top, keys)
    full = _race_kept_blocks(x, exp_weights(x, top), threshold, keys)
    assert len(calls) == 2 and 0 < calls[0] < rows and calls[1] > 0
    decided = torch.ones(rows, dtype=torch.bool) if undecided is None else ~undecided
    assert torch.equal(block[decided], full[decided])


@pytest.mark.parametrize("steps", [[{"temperature": 0.7}, {"min_p": 0.05}], [{"min_p": 0.05}, {"temperature": 0.7}],
                                   [{"min_p": 0.2}, {"temperature": 1.6}], [{"min_p": 0.01}]])
@pytest.mark.parametrize("kind", ["peaked", "flat"])
def test_min_p_tokens_equal_sampling_the_processed_logits(steps, kind):
    """Through the pipeline (min_p hands its block maxima with its cut, a trailing temperature
    maps them): the same tokens as sampling ``process()``'s output, at several positions."""
    rows, vocab = 16, 40_000
    x = _rows(rows, vocab, 7)
    if kind == "flat":
        x = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(2))
    pipe = samplerkit.load_pipeline({"pipeline": steps, "sampler": "categorical"})
    plain = samplerkit.load_pipeline({"pipeline": [], "sampler": "categorical"})
    seeds = list(range(100, 100 + rows))
    bound, reference = pipe.bind(rows, seeds=seeds), plain.bind(rows, seeds=seeds)
    processed = bound.process(x)
    for generated in (0, 3):
        ctx = StepContext(rows, vocab)
        ctx.num_generated.fill_(generated)
        assert torch.equal(bound.sample(x, ctx), reference.sample(processed, ctx))


def test_race_sample_with_block_maxima_equals_without():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(64, 30_000, generator=g) * 2
    threshold = x.amax(-1, keepdim=True) - 2.0
    keys = row_keys(torch.arange(64), torch.full((64,), 9))
    want = race_sample(x.masked_fill(x < threshold, float("-inf")), keys)
    assert torch.equal(race_sample(x, keys, threshold=threshold), want)
    assert torch.equal(race_sample(x, keys, threshold=threshold, block_max=block_maxima(x, RACE_BLOCK)), want)


@pytest.mark.parametrize("rows, vocab", [(5000, 5000), (64, 16384 + 100), (3, 100)])
def test_kept_counts_with_a_short_last_column_chunk(rows, vocab):
    """The kept counts are summed one column chunk at a time; a last chunk narrower than one
    block (5000 rows: 256-wide chunks, 5000 = 19 * 256 + 136) is counted like the others. It
    raised a reshape error mid-sampling before (found by the min_p frequency test in CI)."""
    from samplerkit.ops.random import _kept_counts

    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(rows, vocab, generator=g)
    threshold = x.amax(-1, keepdim=True) - 1.0
    kept = (x >= threshold).float()
    n_blocks = (vocab + RACE_BLOCK - 1) // RACE_BLOCK
    padded = torch.nn.functional.pad(kept, (0, n_blocks * RACE_BLOCK - vocab))
    want = padded.view(rows, n_blocks, RACE_BLOCK).sum(-1)
    assert torch.equal(_kept_counts(x, threshold, None), want)
