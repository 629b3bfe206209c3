"""Rejection sampling accepts exactly the images asked for, at any keep fraction."""
import numpy as np
import pytest

from vqvae2_jax.sampling import rejection


@pytest.mark.parametrize("keep", [1.0, 0.5, 0.3, 0.25, 0.7, 0.1])
def test_sample_accepts_exactly_num_images_per_class(keep):
  """The `sample` stage's rule: ceil(n / keep) candidates cycling the intended classes,
  each class keeping its intended count. keep = 0.3 used to accept 1.2x the request."""
  rng = np.random.default_rng(0)
  intended = np.resize(np.arange(3, dtype=np.int32), 10)  # 10 images over 3 classes
  labels = np.resize(intended, rejection.num_candidates(len(intended), keep))
  scores = rng.random(len(labels))
  accepted = rejection.accept(scores, labels, intended)
  assert accepted.sum() == len(intended)
  for c in range(3):
    assert (accepted & (labels == c)).sum() == (intended == c).sum()
    # The accepted ones are that class's best.
    of_c = scores[labels == c]
    kept = scores[accepted & (labels == c)]
    assert kept.min() >= np.sort(of_c)[::-1][len(kept) - 1]


def test_threshold_can_only_lower_the_count():
  intended = np.zeros(4, np.int32)
  labels = np.zeros(16, np.int32)
  scores = np.linspace(0, 1, 16)
  accepted = rejection.accept(scores, labels, intended, threshold=0.95)
  assert accepted.sum() == 1 and accepted[-1]


def test_num_candidates_rejects_bad_fractions():
  assert rejection.num_candidates(4, 0.3) == 14
  assert rejection.num_candidates(64, 0.25) == 256
  with pytest.raises(ValueError, match="keep_fraction"):
    rejection.num_candidates(4, 0.0)
