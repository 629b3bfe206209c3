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


def test_class_map_applies_to_efficientnet_only():
  """The ImageNet class map of configs/imagenette64.py must not index the trained
  10-class classifier's outputs (it did in `sample`: IndexError on class 217)."""
  imagenet = (0, 217, 482)
  assert rejection.class_map_for("trained", imagenet) is None
  assert rejection.class_map_for("efficientnet_lite0", ()) is None
  np.testing.assert_array_equal(rejection.class_map_for("efficientnet_lite0", imagenet),
                                imagenet)
  probs = np.full((3, 1000), 1e-3)
  probs[np.arange(3), imagenet] = 0.5
  scores = rejection.intended_class_scores(
      probs, np.arange(3), rejection.class_map_for("efficientnet_lite0", imagenet))
  np.testing.assert_array_equal(scores, 0.5)


def test_out_of_range_class_is_a_clear_error():
  with pytest.raises(ValueError, match="class 217 is out of range for a classifier with 10"):
    rejection.intended_class_scores(np.ones((2, 10)) / 10, np.array([0, 1]),
                                    np.array([0, 217]))
