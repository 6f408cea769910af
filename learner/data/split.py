"""DeepSpeed-Chat's data_split rule and blending of several datasets across the three steps.

Per dataset: one permutation seeded by `seed`, cut into three contiguous parts with the proportions of
`data_split` ("2,4,4" -> 20% / 40% / 40%) for steps 1, 2, 3. The parts of all datasets are then blended
(concatenated and shuffled with the same seed), so no record is used by two steps.
"""

from __future__ import annotations

import numpy as np

from common.errors import ConfigError
from learner.data.load import LoadedDataset
from learner.data.sample import Sample


def parse_split(data_split: str) -> list[float]:
    """The three proportions of `data_split`, normalised to sum to 1."""
    try:
        parts = [float(p) for p in str(data_split).split(",")]
    except ValueError:
        raise ConfigError("data_split", f"must be comma-separated numbers, got {data_split!r}") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError("data_split", f"must be three non-negative numbers with a positive sum, got {data_split!r}")
    total = sum(parts)
    return [p / total for p in parts]


def split_bounds(n: int, fractions: list[float]) -> list[int]:
    """Cut points [0, a, b, n] of n items: cumulative proportions, rounded."""
    bounds, cumulative = [0], 0.0
    for fraction in fractions[:-1]:
        cumulative += fraction
        bounds.append(min(n, int(round(cumulative * n))))
    return bounds + [n]


def split_indices(n: int, data_split: str, seed: int) -> list[np.ndarray]:
    """The three index sets of one dataset of n records."""
    order = np.random.default_rng(seed).permutation(n)
    bounds = split_bounds(n, parse_split(data_split))
    return [order[bounds[i]:bounds[i + 1]] for i in range(3)]


def split_for_steps(datasets: list[LoadedDataset], data_split: str, seed: int
                    ) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Samples for steps 1 (SFT), 2 (reward) and 3 (PPO), each blended over all datasets."""
    steps: list[list[Sample]] = [[], [], []]
    for dataset in datasets:
        for step, indices in enumerate(split_indices(len(dataset.samples), data_split, seed)):
            steps[step].extend(dataset.samples[int(i)] for i in indices)
    blended = []
    for step, samples in enumerate(steps):
        order = np.random.default_rng(seed + step + 1).permutation(len(samples))
        blended.append([samples[int(i)] for i in order])
    return blended[0], blended[1], blended[2]


def hold_out(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, eval): the last `fraction` of a seeded permutation is held out (at least 1 when fraction > 0)."""
    if fraction <= 0 or len(samples) < 2:
        return list(samples), []
    order = np.random.default_rng(seed).permutation(len(samples))
    n_eval = min(len(samples) - 1, max(1, int(round(fraction * len(samples)))))
    cut = len(samples) - n_eval
    return [samples[int(i)] for i in order[:cut]], [samples[int(i)] for i in order[cut:]]
