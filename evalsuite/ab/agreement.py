"""Agreement between raters beyond chance: Cohen's kappa for two, Fleiss' kappa for more.

Both take the categories people chose per item. Fleiss' kappa uses the form for a varying number
of ratings per item (each item's observed agreement over its own rating pairs, chance agreement
from the pooled category shares); with the same number of ratings per item it is Fleiss (1971)
exactly. A kappa is undefined (NaN) when chance agreement is 1: every rating in one category.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Agreement:
    method: str  # "cohen" or "fleiss"
    kappa: float
    items: int
    raters: int
    observed: float  # share of agreeing rating pairs
    expected: float  # the same by chance

    def to_dict(self) -> dict[str, object]:
        kappa = self.kappa if math.isfinite(self.kappa) else None
        return {"method": self.method, "kappa": kappa, "items": self.items,
                "raters": self.raters, "observed": self.observed, "expected": self.expected}


def _kappa(observed: float, expected: float) -> float:
    return math.nan if expected >= 1 else (observed - expected) / (1 - expected)


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> Agreement:
    """Two raters' categories for the same items, in the same order."""
    if len(first) != len(second):
        raise ValueError(f"cohen_kappa needs equal lengths, got {len(first)} and {len(second)}")
    if not first:
        raise ValueError("cohen_kappa needs at least one item rated by both raters")
    n = len(first)
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    p1, p2 = Counter(first), Counter(second)
    expected = sum(p1[c] * p2[c] for c in p1) / (n * n)
    return Agreement("cohen", _kappa(observed, expected), n, 2, observed, expected)


def fleiss_kappa(items: Sequence[Mapping[str, int]]) -> Agreement:
    """Per item, how many raters chose each category; items need at least two ratings."""
    if not items:
        raise ValueError("fleiss_kappa needs at least one item")
    per_item, totals = [], Counter()
    for i, counts in enumerate(items):
        n = sum(counts.values())
        if n < 2:
            raise ValueError(f"item {i} has {n} rating(s); Fleiss' kappa needs at least 2")
        per_item.append(sum(c * (c - 1) for c in counts.values()) / (n * (n - 1)))
        totals.update(counts)
    observed = sum(per_item) / len(per_item)
    grand = sum(totals.values())
    expected = sum((c / grand) ** 2 for c in totals.values())
    raters = max(sum(c.values()) for c in items)
    return Agreement("fleiss", _kappa(observed, expected), len(items), raters, observed, expected)


def rater_agreement(labels: Mapping[str, Mapping[str, str]]) -> Agreement | None:
    """Agreement over items rated by two or more people: `labels[item][rater] = category`.

    Cohen's kappa when exactly two raters share items, Fleiss' when more do; None when no item
    has two ratings.
    """
    shared = {item: by_rater for item, by_rater in labels.items() if len(by_rater) >= 2}
    if not shared:
        return None
    raters = sorted({r for by_rater in shared.values() for r in by_rater})
    if len(raters) == 2:
        a, b = raters
        items = sorted(shared)
        return cohen_kappa([shared[i][a] for i in items], [shared[i][b] for i in items])
    return fleiss_kappa([Counter(by_rater.values()) for by_rater in shared.values()])
