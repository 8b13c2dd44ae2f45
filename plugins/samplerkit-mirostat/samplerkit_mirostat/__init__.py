"""samplerkit-mirostat: Mirostat v1 and v2 samplers (llama.cpp semantics) with per-row state.

The adaptive target ``mu`` of each row lives in the step context, ``ctx.state[MU_KEY]`` (a
``[B]`` float32 tensor). The decode loop keeps every tensor in ``ctx.state`` aligned with its
row when rows finish or fan out, so this plugin never does batch bookkeeping: it reads ``mu``,
samples, and writes the updated ``mu`` back.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

import samplerkit
from samplerkit import StepContext
from samplerkit.export import LlamaCppSampler
from samplerkit.ops import NEG_INF, top_k_mask
from samplerkit.seeded import SeededSampler, SeedParams

__all__ = ["MU_KEY", "Mirostat", "MirostatV2", "mirostat_k", "register_samplers"]

#: Key of the per-row ``mu`` in :attr:`samplerkit.StepContext.state` (namespaced by plugin).
MU_KEY = "mirostat.mu"

_LN2 = math.log(2.0)
#: Parameter -> llama.cpp flag, shared by both versions (llama.cpp runs `temp` then mirostat, ignoring --samplers).
_LLAMACPP_PARAMS = {"eta": "--mirostat-lr", "tau": "--mirostat-ent", "seed": "--seed"}


class _MirostatBase(SeededSampler):
    # SeededSampler owns the per-row streams: unseeded rows get a seed from torch's global
    # generator once per batch composition, and the pipeline carries it over when rows are selected.

    def mu(self, ctx: StepContext) -> torch.Tensor:
        """The rows' current ``mu`` ``[B]``; ``2 * tau`` for a context that has none yet."""
        mu = ctx.state.get(MU_KEY)
        if mu is None or mu.shape[0] != self.batch_size:
            mu = 2.0 * self.p.tau
            ctx.state[MU_KEY] = mu
        return mu

    def finish(self, kept: torch.Tensor, ids: torch.Tensor, mu: torch.Tensor, ctx: StepContext) -> None:
        """``mu <- mu - eta * (-log2 p_chosen - tau)``, ``p`` renormalised over the kept tokens."""
        logp = kept.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(kept, dim=-1)
        surprise = -logp / _LN2
        ctx.state[MU_KEY] = mu - self.p.eta * (surprise - self.p.tau)

    def draw(self, kept: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return self.streams.race(kept, ctx)

    def kept(self, logits: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """``logits`` with the tokens this step's truncation removes at ``mu`` set to ``-inf``."""
        raise NotImplementedError

    def distribution(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """What :meth:`sample` draws from: ``softmax`` over the kept tokens, ``[B, V]`` (the
        claim ``samplerkit.testing.check_sampler`` tests the draws against)."""
        return torch.softmax(self.kept(logits, self.mu(ctx)), dim=-1)

    def sample(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        mu = self.mu(ctx)
        kept = self.kept(logits, mu)
        ctx.record_distribution(kept)       # logprobs are reported under the kept set, not the input
        ids = self.draw(kept, ctx)
        self.finish(kept, ids, mu, ctx)
        return ids


class _Params(SeedParams):
    tau: float = Field(5.0, ge=0.0, description="target surprise in bits (cross-entropy); mu starts at 2 * tau")
    eta: float = Field(0.1, ge=0.0, description="learning rate of mu")


class Mirostat(_MirostatBase):
    """Mirostat 1.0: top-k with ``k`` chosen each step so the expected surprise approaches ``tau``, then sample.

    llama.cpp's ``mirostat`` (Basu et al. 2021). From the top ``m`` probabilities it estimates
    the Zipf exponent ``s = sum t_i b_i / sum t_i^2`` (``t_i = log((i+2)/(i+1))``,
    ``b_i = log(p_i / p_{i+1})``), keeps ``k = ((e 2^mu) / (1 - V^-e))^(1/s)`` tokens
    (``e = s - 1``, ``V`` the vocabulary size), samples by the exponential race, and updates the
    row's ``mu <- mu - eta (-log2 p_chosen - tau)`` (``p`` renormalised over the ``k`` kept).
    ``mu`` starts at ``2 tau`` and is kept per row in ``ctx.state["mirostat.mu"]``. Usually after
    ``temperature`` alone (llama.cpp ignores top-k/top-p with mirostat). Statistics are over the
    row's finite logits; ``k`` is clamped to ``[1, finite tokens]`` (at ties, lower ids first).

    >>> import torch
    >>> from samplerkit import StepContext
    >>> s = Mirostat([Mirostat.Params(seed=1)])
    >>> ctx = StepContext(1)
    >>> int(s.sample(torch.tensor([[9.0, 0.0, 0.0, 0.0]]), ctx))    # k = 1 here: greedy
    0
    >>> ctx.state["mirostat.mu"]                # 10 - 0.1 * (0 - 5)
    tensor([10.5000])
    """

    name = "mirostat"
    #: ``samplerkit export llamacpp``: llama.cpp's ``--mirostat 1`` (its m is fixed at 100).
    llamacpp = LlamaCppSampler(flags={"--mirostat": "1"}, params=_LLAMACPP_PARAMS, fixed={"m": 100},
                               replaces_chain=True)

    class Params(_Params):
        m: int = Field(100, ge=2, description="number of top tokens used to estimate the Zipf exponent")

    def __init__(self, rows, device="cpu"):
        super().__init__(rows, device)
        self._m_max = max(row.m for row in self.rows)

    @classmethod
    def contract_examples(cls):
        return [{"tau": 3.0, "eta": 0.1, "seed": 1}, {"tau": 0.5, "eta": 1.0, "m": 2, "seed": 2},
                {"tau": 8.0, "eta": 0.0, "m": 10, "seed": 3}]

    def kept(self, logits: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        k = mirostat_k(logits, mu, self.p.m, self._m_max)
        vocab = logits.shape[-1]
        return logits.masked_fill(~top_k_mask(logits, k, min(int(k.max()), vocab)), NEG_INF)


def mirostat_k(logits: torch.Tensor, mu: torch.Tensor, m: torch.Tensor, m_max: int) -> torch.Tensor:
    """Mirostat 1.0's ``k`` per row ``[B]`` int64 (llama.cpp's formula, in float64).

    ``b_i = log(p_i / p_{i+1})`` is computed as ``x_i - x_{i+1}`` (no softmax, so no underflow).
    Rows with one finite logit get ``k = 1``; ``k`` is clamped to the number of finite logits.

    >>> x = -1.2 * torch.log(torch.arange(1, 101, dtype=torch.float32)).unsqueeze(0)   # Zipf, s = 1.2
    >>> int(mirostat_k(x, torch.tensor([6.0]), torch.tensor([100]), 100))   # (0.2 * 2^6 / (1 - 100^-0.2))^(1/1.2)
    12
    """
    vocab = logits.shape[-1]
    n = torch.isfinite(logits).sum(-1)
    width = min(m_max, vocab)
    top = logits.topk(width, dim=-1).values.double()                   # sorted descending
    i = torch.arange(width - 1, device=logits.device, dtype=torch.float64)
    t = torch.log((i + 2) / (i + 1))
    pairs = (i < (m.unsqueeze(-1) - 1)) & (i < (n.unsqueeze(-1) - 1))
    b = torch.where(pairs, top[:, :-1] - top[:, 1:], torch.zeros_like(t))
    s_hat = (t * b).sum(-1) / (t * t * pairs).sum(-1)                  # NaN without pairs: k = 1 below
    e = s_hat - 1
    # e / (1 - V^-e), whose limit at e = 0 is 1 / ln V.
    log_v = math.log(max(vocab, 2))
    ratio = torch.where(e.abs() < 1e-9, torch.full_like(e, 1 / log_v), e / (-torch.expm1(-e * log_v)))
    k = (ratio * torch.exp2(mu.double())).pow(1 / s_hat)
    k = torch.nan_to_num(k, nan=1.0, posinf=float(vocab)).clamp(max=float(vocab)).floor()
    return k.clamp(min=1).minimum(n.clamp(min=1).double()).to(torch.int64)


class MirostatV2(_MirostatBase):
    """Mirostat 2.0: keep tokens whose surprise ``-log2 p_i`` is at most ``mu``, sample, and move ``mu`` toward ``tau``.

    llama.cpp's ``mirostat_v2``: the most probable token always stays; after the draw
    ``mu <- mu - eta (-log2 p_chosen - tau)`` with ``p`` renormalised over the kept tokens.
    ``mu`` starts at ``2 tau`` and is kept per row in ``ctx.state["mirostat.mu"]``. Usually after
    ``temperature`` alone.

    >>> import torch
    >>> from samplerkit import StepContext
    >>> s = MirostatV2([MirostatV2.Params(tau=0.5, eta=1.0, seed=1)])     # mu = 1: keep p >= 1/2
    >>> ctx = StepContext(1)
    >>> int(s.sample(torch.log(torch.tensor([[0.6, 0.3, 0.1]])), ctx))
    0
    >>> ctx.state["mirostat.mu"]                # 1 - 1.0 * (0 - 0.5)
    tensor([1.5000])
    """

    name = "mirostat_v2"
    #: ``samplerkit export llamacpp``: llama.cpp's ``--mirostat 2``.
    llamacpp = LlamaCppSampler(flags={"--mirostat": "2"}, params=_LLAMACPP_PARAMS, replaces_chain=True)

    class Params(_Params):
        pass

    @classmethod
    def contract_examples(cls):
        return [{"tau": 3.0, "eta": 0.1, "seed": 1}, {"tau": 0.5, "eta": 1.0, "seed": 2}, {"tau": 1.0, "eta": 0.0, "seed": 3}]

    def kept(self, logits: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)
        keep = (-logp / _LN2) <= mu.unsqueeze(-1)
        top = logits.argmax(dim=-1, keepdim=True)
        keep.scatter_(-1, top, True)                                       # never empty
        return logits.masked_fill(~keep, NEG_INF)


@samplerkit.hookimpl
def register_samplers():
    return [Mirostat, MirostatV2]
