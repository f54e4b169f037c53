"""Temperature scaling: the one number that makes the served confidences honest.

After training, the best model's logits on the held-out validation split (never trained on) are divided
by the temperature T that minimises their negative log-likelihood; the manifest carries T and serving
divides by it (`softmax(logits / T)`). T moves no answer, only how sure each one claims to be, so
`uncertain` (confidence under API__UNCERTAIN_BELOW) flags the answers that are likely wrong.
"""

from __future__ import annotations

import math
from typing import Final

import torch
import torch.nn.functional as F

MIN_T: Final = 0.05
MAX_T: Final = 20.0
_STEPS: Final = 60  # golden-section steps on log T: far below any difference that matters


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature)."""
    return float(F.cross_entropy(logits.float() / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in [MIN_T, MAX_T] minimising the NLL (convex in 1/T, so a golden-section search finds it)."""
    if logits.shape[0] == 0:
        return 1.0
    lo, hi = math.log(MIN_T), math.log(MAX_T)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    for _ in range(_STEPS):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, labels, math.exp(b))
    return round(math.exp((lo + hi) / 2.0), 4)
