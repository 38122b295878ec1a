"""Scores of a grounded sample: how much the grounding moved the model's token distributions.

With ``q_t = q(· | z_<t, c, g)`` and ``p_t = p(· | z_<t, c)`` at each position ``t`` of a
continuation ``z``:

* log-ratio ``S(q, p) = Σ_t Σ_v q_{v,t} (log q_{v,t} − log p_{v,t}) = Σ_t KL(q_t ‖ p_t)``
* weighted difference ``Δ(q, p) = Σ_t Σ_v q log q − Σ_t Σ_v p log p = Σ_t (H(p_t) − H(q_t))``

Inputs are log-probabilities (log-softmax outputs) of shape ``[batch, time, vocab]`` and a
``[batch, time]`` mask that is 1 on real continuation positions and 0 on padding; padding never
counts. ``normalization="sum"`` is the paper's; ``"mean"`` divides by the number of real positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Normalization = Literal["sum", "mean"]


@dataclass(frozen=True)
class PositionStats:
    """Per-position statistics, each ``[batch, time]``; zero on padding."""

    kl: torch.Tensor
    entropy_q: torch.Tensor
    entropy_p: torch.Tensor


@dataclass(frozen=True)
class SequenceScores:
    S: torch.Tensor  # [batch]
    delta: torch.Tensor  # [batch]
    positions: PositionStats


def _xlogy_exp(logx: torch.Tensor) -> torch.Tensor:
    """x · log x from log x, with 0 · log 0 = 0 (a -inf log-prob contributes nothing)."""
    return torch.where(torch.isneginf(logx), torch.zeros_like(logx), logx.exp() * logx)


def position_stats(logq: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> PositionStats:
    """Exact full-vocabulary KL(q_t ‖ p_t), H(q_t) and H(p_t) at every position."""
    if logq.shape != logp.shape or logq.dim() != 3:
        raise ValueError(f"logq and logp must both be [batch, time, vocab], got {logq.shape} and {logp.shape}")
    if mask.shape != logq.shape[:2]:
        raise ValueError(f"mask must be [batch, time] = {tuple(logq.shape[:2])}, got {tuple(mask.shape)}")
    logq, logp = logq.double(), logp.double()
    m = mask.to(logq.dtype)
    q_log_q = _xlogy_exp(logq)
    # q·log p where q = 0 contributes 0 even if log p = -inf.
    q_log_p = torch.where(torch.isneginf(logq), torch.zeros_like(logp), logq.exp() * logp)
    kl = (q_log_q - q_log_p).sum(-1)
    hq = -q_log_q.sum(-1)
    hp = -_xlogy_exp(logp).sum(-1)
    return PositionStats(kl=kl * m, entropy_q=hq * m, entropy_p=hp * m)


def reduce_positions(values: torch.Tensor, mask: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    total = (values * mask.to(values.dtype)).sum(-1)
    if normalization == "sum":
        return total
    if normalization == "mean":
        return total / mask.to(values.dtype).sum(-1).clamp(min=1)
    raise ValueError(f"unknown normalization {normalization!r}")


def scores_from_stats(stats: PositionStats, mask: torch.Tensor, normalization: Normalization) -> SequenceScores:
    return SequenceScores(
        S=reduce_positions(stats.kl, mask, normalization),
        delta=reduce_positions(stats.entropy_p - stats.entropy_q, mask, normalization),
        positions=stats,
    )


def sequence_scores(
    logq: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, normalization: Normalization = "sum"
) -> SequenceScores:
    """Exact S and Δ per sequence from full-vocabulary log-probs."""
    return scores_from_stats(position_stats(logq, logp, mask), mask, normalization)
