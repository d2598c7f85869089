"""Many / Medium / Few: the shot groups every long-tailed benchmark reports, from training counts.
(Its own module so that the dataset readers, the metrics and the tables all share it without
importing each other.)"""

from __future__ import annotations

import numpy as np


def shot_groups(counts, many: int, few: int) -> np.ndarray:
    """Group label per class: 'many' (n > many), 'few' (n < few), else 'medium' (boundaries included)."""
    counts = np.asarray(counts)
    return np.where(counts > many, "many", np.where(counts < few, "few", "medium"))
