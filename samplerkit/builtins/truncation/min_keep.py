"""What the truncations with a ``min_tokens_to_keep`` parameter share (epsilon, eta, typical_p)."""

from __future__ import annotations


class KeepsMinTokens:
    """Mixin for a truncation whose ``Params`` has ``min_tokens_to_keep``: each row's
    ``min_tokens_to_keep`` most probable tokens always stay, which :meth:`keeps_all_of` declares
    (for ``samplerkit lint`` and the contract checks), and ``_min_keep_max`` is the largest of
    them in the batch (a host int: the width of ``keep_top_count``'s top-k)."""

    @classmethod
    def keeps_all_of(cls, params) -> int:
        return params.min_tokens_to_keep

    def __init__(self, rows, device="cpu"):
        super().__init__(rows, device)
        self._min_keep_max = max(row.min_tokens_to_keep for row in self.rows)
