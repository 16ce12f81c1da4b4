"""Scorers the core's searches take from outside it: a sample set's quality as one number, lower is better.

The core (``distill.consistency.search_timesteps``) only defines what a scorer is
(:class:`distill.consistency.Scorer`); the metrics live here, so the core never imports ``benchmarks``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from benchmarks.metrics import Quality
from distill.errors import UsageError

LOWER_IS_BETTER = ("fd", "kid", "fid", "kid_inception")


@dataclass(frozen=True)
class QualityScorer:
    """A :class:`distill.consistency.Scorer` by one :class:`~benchmarks.metrics.Quality` metric (default: the FD on
    the data's domain classifier features). Preparing it on data without that classifier raises the
    :class:`~distill.errors.UsageError` that makes the search skip."""

    metric: str = "fd"

    def __post_init__(self):
        if self.metric not in LOWER_IS_BETTER:
            raise UsageError(f"scorer metric {self.metric!r}: a search minimizes it, use one of "
                             f"{', '.join(LOWER_IS_BETTER)}")

    def __call__(self, data, ref: str) -> Callable[[np.ndarray, Tensor | None], float]:
        quality = Quality(data, ref=ref, metrics=(self.metric,), progress=False).prepare()

        def score(images: np.ndarray, labels: Tensor | None = None) -> float:
            return float(quality(images, labels)[self.metric])

        return score
