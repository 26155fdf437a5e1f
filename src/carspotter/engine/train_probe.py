"""Which training photos the per-epoch eval-mode check scores (`train.eval_train_max`)."""

from __future__ import annotations


def probe_indices(n: int, max_items: int) -> list[int]:
    """`min(n, max_items)` indices spread evenly over 0..n-1 (every class, since manifests are class-ordered),
    the same every epoch so the curve compares like with like."""
    if max_items <= 0 or n <= 0:
        return []
    if max_items >= n:
        return list(range(n))
    return sorted({(i * n) // max_items for i in range(max_items)})
