import math

import numpy as np
import pytest
import torch
from scipy.special import rel_entr

from svp.scoring import position_stats, sequence_scores


def _logits_to_logprobs(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x.double(), dim=-1)


def test_hand_computed_three_token_vocabulary():
    q = torch.tensor([[[0.5, 0.25, 0.25], [0.9, 0.05, 0.05]]], dtype=torch.float64)
    p = torch.tensor([[[0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]]], dtype=torch.float64)
    mask = torch.ones(1, 2)
    out = sequence_scores(q.log(), p.log(), mask)
    # position 1: 0.5 ln2 + 0.25 ln(0.5) + 0 = 0.25 ln 2
    kl1 = 0.25 * math.log(2)
    # position 2: 0.9 ln(2.7) + 2 * 0.05 ln(0.15)
    kl2 = 0.9 * math.log(2.7) + 0.1 * math.log(0.15)
    assert out.S.item() == pytest.approx(kl1 + kl2, abs=1e-12)
    h_q = -(0.5 * math.log(0.5) + 0.5 * math.log(0.25)) - (0.9 * math.log(0.9) + 0.1 * math.log(0.05))
    h_p = -(0.5 * math.log(0.25) + 0.5 * math.log(0.5)) + math.log(3)
    assert out.delta.item() == pytest.approx(h_p - h_q, abs=1e-12)


def test_matches_scipy_and_torch_distributions_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    logq = _logits_to_logprobs(torch.randn(4, 7, 50, generator=g) * 3)
    logp = _logits_to_logprobs(torch.randn(4, 7, 50, generator=g) * 3)
    mask = torch.ones(4, 7)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    out = sequence_scores(logq, logp, mask)
    q, p = logq.exp().double().numpy(), logp.exp().double().numpy()
    for b in range(4):
        n = int(mask[b].sum())
        ref_s = rel_entr(q[b, :n], p[b, :n]).sum()
        assert out.S[b].item() == pytest.approx(ref_s, rel=1e-9)
        dist_q = torch.distributions.Categorical(logits=logq[b, :n].double())
        dist_p = torch.distributions.Categorical(logits=logp[b, :n].double())
        assert out.S[b].item() == pytest.approx(torch.distributions.kl_divergence(dist_q, dist_p).sum().item(), rel=1e-9)
        ref_delta = (dist_p.entropy() - dist_q.entropy()).sum().item()
        assert out.delta[b].item() == pytest.approx(ref_delta, rel=1e-9, abs=1e-9)


def test_properties_nonnegative_zero_when_equal_and_padding_ignored():
    g = torch.Generator().manual_seed(1)
    logq = _logits_to_logprobs(torch.randn(3, 5, 11, generator=g))
    logp = _logits_to_logprobs(torch.randn(3, 5, 11, generator=g))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    out = sequence_scores(logq, logp, mask)
    assert (out.S >= 0).all()
    same = sequence_scores(logq, logq, mask)
    assert torch.allclose(same.S, torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(same.delta, torch.zeros(3, dtype=torch.float64))
    # Garbage in padded positions changes nothing.
    noisy_q = logq.clone()
    noisy_q[0, 3:] = _logits_to_logprobs(torch.randn(2, 11, generator=g) * 10)
    assert torch.allclose(sequence_scores(noisy_q, logp, mask).S, out.S)
    assert (out.positions.kl[0, 3:] == 0).all()


def test_mean_normalisation_divides_by_real_length():
    g = torch.Generator().manual_seed(2)
    logq = _logits_to_logprobs(torch.randn(2, 4, 6, generator=g))
    logp = _logits_to_logprobs(torch.randn(2, 4, 6, generator=g))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    s = sequence_scores(logq, logp, mask, "sum")
    m = sequence_scores(logq, logp, mask, "mean")
    assert torch.allclose(m.S, s.S / torch.tensor([2.0, 4.0], dtype=torch.float64))
    assert torch.allclose(m.delta, s.delta / torch.tensor([2.0, 4.0], dtype=torch.float64))


def test_zero_probabilities_are_handled():
    q = torch.tensor([[[1.0, 0.0, 0.0]]])
    p = torch.tensor([[[0.5, 0.5, 0.0]]])
    out = sequence_scores(q.log(), p.log(), torch.ones(1, 1))
    assert out.S.item() == pytest.approx(math.log(2))
    assert out.delta.item() == pytest.approx(math.log(2))


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="batch, time, vocab"):
        position_stats(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="mask"):
        position_stats(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 3))
    assert np.isfinite(position_stats(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), torch.ones(1, 1)).kl.numpy()).all()
