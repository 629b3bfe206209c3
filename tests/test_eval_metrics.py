"""Metrics, statistics I/O, feature extraction and error paths (no torch needed)."""
from __future__ import annotations

import ast
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest
import flax.linen as nn
from flax import traverse_util
from jax.sharding import AxisType

from vqvae2_jax.eval import classifier
from vqvae2_jax.eval import convert
from vqvae2_jax.eval import feature_networks as features
from vqvae2_jax.eval import metrics


def _random_stats(rng, n, d, shift=0.0):
  x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + shift
  return x.mean(0), np.cov(x, rowvar=False)


# ---------------------------------------------------------------- FID

def test_frechet_distance_matches_formula():
  rng = np.random.RandomState(0)
  mu1, s1 = _random_stats(rng, 200, 6)
  mu2, s2 = _random_stats(rng, 150, 6, shift=0.5)
  # Tr((s1 s2)^1/2) = Tr((A s2 A)^1/2) with A = s1^1/2 symmetric: eigenvalues
  # of a symmetric PSD matrix instead of a general sqrtm.
  w, v = np.linalg.eigh(s1)
  a = (v * np.sqrt(w)) @ v.T
  tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(a @ s2 @ a), 0, None)).sum()
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), want, rtol=1e-8)
  assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-8
  # 1-D Gaussians: (m1 - m2)^2 + (sd1 - sd2)^2.
  np.testing.assert_allclose(
      metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]), 4.0 + 1.0, rtol=1e-12)


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- IS

def _is_reference(logits, splits):
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  scores = []
  for part in np.array_split(p, splits):  # Equal splits here (N % splits == 0).
    py = part.mean(0)
    kl = (part * (np.log(part) - np.log(py))).sum(1)
    scores.append(np.exp(kl.mean()))
  return np.mean(scores), np.std(scores)


def test_inception_score_matches_numpy_reference():
  rng = np.random.RandomState(1)
  logits = rng.normal(size=(100, 12)) * 3
  np.testing.assert_allclose(metrics.inception_score(logits, splits=5),
                             _is_reference(logits, 5), rtol=1e-10)
  perm = np.random.RandomState(2020).permutation(100)
  np.testing.assert_allclose(metrics.inception_score(logits, splits=5, shuffle_seed=2020),
                             _is_reference(logits[perm], 5), rtol=1e-10)
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  np.testing.assert_allclose(metrics.inception_score_from_probs(p, splits=5),
                             _is_reference(logits, 5), rtol=1e-8)
  # Confident, evenly spread predictions over C classes score C.
  confident = 60.0 * np.eye(10)[np.arange(100) % 10]
  mean, std = metrics.inception_score(confident, splits=10)
  assert abs(mean - 10) < 1e-6 and std < 1e-6
  with pytest.raises(ValueError, match="at least"):
    metrics.inception_score(logits[:3], splits=10)


# ---------------------------------------------------------------- precision / recall

def _pr_brute_force(real, fake, k):
  def d(a, b):
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
  r_real = np.sort(d(real, real), axis=1)[:, k]
  r_fake = np.sort(d(fake, fake), axis=1)[:, k]
  d_fr = d(fake, real)
  precision = (d_fr <= r_real[None, :]).any(1).mean()
  recall = (d_fr.T <= r_fake[None, :]).any(1).mean()
  return precision, recall


def _fidelity_prc_function():
  """torch-fidelity's calculate_precision_recall_part, read from its source.

  Its module imports torchvision (absent beside torch 2.13), so the two
  functions are compiled from the file on their own.
  """
  torch = pytest.importorskip("torch", reason="torch not installed (optional extra)")
  spec = importlib.util.find_spec("torch_fidelity")
  if spec is None:
    pytest.skip("torch-fidelity not installed (optional extra)")
  src_path = os.path.join(list(spec.submodule_search_locations)[0], "metric_prc.py")
  tree = ast.parse(open(src_path).read())
  wanted = {"calc_cdist_part", "calculate_precision_recall_part"}
  module = ast.Module([n for n in tree.body if isinstance(n, ast.FunctionDef)
                       and n.name in wanted], type_ignores=[])
  ns = {"torch": torch}
  exec(compile(module, src_path, "exec"), ns)  # pylint: disable=exec-used
  return lambda real, fake, k: ns["calculate_precision_recall_part"](
      torch.from_numpy(fake), torch.from_numpy(real), k, 16)


def test_precision_recall_matches_brute_force():
  rng = np.random.RandomState(2)
  real = rng.normal(size=(70, 5)).astype(np.float32)
  fake = (rng.normal(size=(45, 5)) * 1.3 + 0.4).astype(np.float32)
  got = metrics.precision_recall(real, fake, k=3, batch_size=16)
  want = _pr_brute_force(real.astype(np.float64), fake.astype(np.float64), 3)
  np.testing.assert_allclose(got, want, atol=1e-12)
  assert 0 < got[0] < 1 and 0 < got[1] < 1  # Non-trivial case.
  np.testing.assert_allclose(metrics.precision_recall(real, real, k=3), (1.0, 1.0))
  with pytest.raises(ValueError, match="more than k=3"):
    metrics.precision_recall(real[:3], fake, k=3)


def test_precision_recall_matches_torch_fidelity():
  fidelity = _fidelity_prc_function()
  rng = np.random.RandomState(3)
  real = rng.normal(size=(60, 8)).astype(np.float32)
  fake = (rng.normal(size=(50, 8)) * 0.8 + 0.3).astype(np.float32)
  np.testing.assert_allclose(metrics.precision_recall(real, fake, k=3, batch_size=16),
                             fidelity(real, fake, 3), atol=1e-12)


# ---------------------------------------------------------------- statistics

def test_streaming_moments_match_numpy():
  rng = np.random.RandomState(4)
  x = rng.normal(size=(103, 7)) * 3 + 1000.0  # Large offset: stability matters.
  acc = metrics.StreamingMoments(7)
  for lo, hi in [(0, 1), (1, 40), (40, 41), (41, 103)]:
    acc.update(x[lo:hi])
  mu, sigma = acc.stats()
  np.testing.assert_allclose(mu, x.mean(0), rtol=1e-13)
  np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-11)
  one = metrics.StreamingMoments(7)
  one.update(x[:1])
  with pytest.raises(ValueError, match="at least 2 images"):
    one.covariance()
  few = metrics.StreamingMoments(7)
  few.update(x[:4])
  with pytest.warns(UserWarning, match="only 4 images for 7-dimensional"):
    few.covariance()


def test_stats_npz_round_trip_pytorch_fid_format(tmp_path):
  rng = np.random.RandomState(5)
  mu, sigma = _random_stats(rng, 30, 4)
  path = str(tmp_path / "ref.npz")
  metrics.save_stats(path, mu, sigma)
  with np.load(path) as data:  # What pytorch-fid reads.
    assert sorted(data.files) == ["mu", "sigma"]
  mu2, sigma2 = metrics.load_stats(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  np.savez(str(tmp_path / "bad.npz"), m=mu)
  with pytest.raises(ValueError, match="expected 'mu' and 'sigma'"):
    metrics.load_stats(str(tmp_path / "bad.npz"))
  with pytest.raises(FileNotFoundError):
    metrics.load_stats(str(tmp_path / "missing.npz"))


# ---------------------------------------------------------------- extraction

def _tiny_classifier():
  model = classifier.ResNetClassifier(num_classes=5, width=8, stage_sizes=(1, 1))
  # Shapes by tracing only, values from NumPy: an op-by-op init would cost
  # seconds of XLA compilation on a CPU.
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                        jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.uint8)))
  rng = np.random.RandomState(0)
  variables = jax.tree.map(
      lambda s: (rng.normal(size=s.shape) * 0.3).astype(np.float32), shapes)

  def apply_fn(v, images):
    logits = model.apply(v, images)
    return {"logits": logits, "probs": jax.nn.softmax(logits)}
  return model, variables, apply_fn


def test_sharded_extraction_equals_unsharded():
  assert jax.device_count() == 8
  _, variables, apply_fn = _tiny_classifier()
  rng = np.random.RandomState(6)
  images = rng.randint(0, 256, size=(21, 16, 16, 3)).astype(np.uint8)
  chunks = [images[:5], images[5:12], images[12:13], images[13:]]
  from vqvae2_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  with parallel.use_mesh(mesh, ()):  # sharded over the ambient mesh's 'data' axis
    sharded = features.extract_features(apply_fn, variables, iter(chunks), batch_size=8,
                                        moments=("logits",))
  plain = features.extract_features(apply_fn, variables, iter(chunks), batch_size=8,
                                    moments=("logits",))
  assert sharded.num_images == plain.num_images == 21
  direct = np.asarray(jax.jit(apply_fn)(variables, images)["logits"])
  np.testing.assert_allclose(plain.features["logits"], direct, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sharded.features["logits"], plain.features["logits"],
                             rtol=1e-5, atol=1e-6)
  mu, sigma = sharded.moments["logits"].stats()
  np.testing.assert_allclose(mu, direct.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sigma, np.cov(direct, rowvar=False), rtol=1e-4, atol=1e-6)
  only = features.extract_features(apply_fn, variables, iter(chunks), batch_size=8,
                                   keep=("probs",))
  assert set(only.features) == {"probs"}
  with pytest.raises(ValueError, match="multiple of the mesh"), parallel.use_mesh(mesh, ()):
    features.extract_features(apply_fn, variables, iter(chunks), batch_size=6)


def test_classifier_scorer_matches_direct_softmax():
  from vqvae2_jax import parallel  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.sampling import scorers  # pylint: disable=g-import-not-at-top
  model, variables, apply_fn = _tiny_classifier()
  images = np.random.RandomState(7).randint(0, 256, size=(6, 16, 16, 3)).astype(np.uint8)
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  # 6 images over batches of 8 (the mesh size): one padded batch, padding dropped.
  with parallel.use_mesh(mesh, ()):
    score = scorers.classifier_scorer(model, variables["params"], batch_size=8)
  probs = score(images)  # bound to the mesh it was made under
  assert probs.shape == (6, model.num_classes)
  np.testing.assert_allclose(probs, np.asarray(apply_fn(variables, images)["probs"]),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_to_uint8_rounds_and_clips():
  x = np.array([[-1.0, -0.999, 0.0, 1.0, 1.5]])
  np.testing.assert_array_equal(features.to_uint8(x, (-1.0, 1.0)), [[0, 0, 128, 255, 255]])


# ---------------------------------------------------------------- weights files

def _fake_converted(tmp_path, name, sha):
  shapes = convert.expected_shapes(name)
  rng = np.random.RandomState(0)
  flat = {p: rng.normal(size=s).astype(np.float32) * 0.01 for p, s in shapes.items()}
  for p in flat:
    if p[-1] == "var":
      flat[p] = np.ones_like(flat[p])
  variables = traverse_util.unflatten_dict(flat)
  path = str(tmp_path / f"{name}.npz")
  convert.save_converted(path, variables, {"network": name, "source_sha256": sha})
  return path, variables


def test_converted_npz_round_trip_and_registry(tmp_path):
  path, variables = _fake_converted(tmp_path, "efficientnet_lite0", "0" * 64)
  loaded, meta = convert.load_converted(path, "efficientnet_lite0")
  assert meta["network"] == "efficientnet_lite0"
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  apply_fn, params, info = features.load_feature_network("efficientnet_lite0", path)
  assert info["feature_key"] == "features" and info["feature_dim"] == 1280
  assert not info["comparable_with_published"]
  jax.tree.map(np.testing.assert_array_equal, params, variables)
  with pytest.raises(ValueError, match="holds weights of 'efficientnet_lite0', not 'vgg16'"):
    convert.load_converted(path, "vgg16")


def test_inception_comparability_needs_the_real_file(tmp_path):
  path, _ = _fake_converted(tmp_path, "inception", "6726825d" + "0" * 56)
  _, _, info = features.load_feature_network("inception", path)
  assert info["comparable_with_published"] and info["feature_key"] == "pool3"
  other = str(tmp_path / "other.npz")
  variables, _ = convert.load_converted(path)
  convert.save_converted(other, variables, {"network": "inception", "source_sha256": "ab" * 32})
  with pytest.warns(UserWarning, match="not comparable"):
    _, _, info = features.load_feature_network("inception", other)
  assert not info["comparable_with_published"]


def test_bad_weights_inputs(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  monkeypatch.setenv(features.WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
    features.load_feature_network("inception")
  with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
    features.load_feature_network("vgg16", str(tmp_path / "nope.pth"))
  with pytest.raises(ValueError, match="unknown feature network"):
    features.load_feature_network("resnet50", str(tmp_path / "x.pth"))
  # A state dict of something else: names missing and unexpected keys.
  with pytest.raises(ValueError, match=r"missing keys: classifier.0.bias(.|\n)*unexpected keys: foo"):
    convert.convert_state_dict("vgg16", {"foo": np.zeros(3)})
  junk = tmp_path / "junk.npz"
  junk.write_text("not an npz")
  with pytest.raises(ValueError, match="not a readable .npz"):
    convert.load_converted(str(junk))
  no_meta = str(tmp_path / "plain.npz")
  np.savez(no_meta, a=np.zeros(2))
  with pytest.raises(ValueError, match="not written by save_converted"):
    convert.load_converted(no_meta)
  with pytest.raises(ValueError, match="no images"):
    features.extract_features(lambda p, x: x, {}, iter([]), batch_size=2)


def test_classifier_input_pool_equals_classifying_pooled_images():
  """input_pool=2 on 16x16 images is the same network as input_pool=1 on their 2x2
  averages (float input in [-1, 1])."""
  model, variables, _ = _tiny_classifier()
  pooled_model = classifier.ResNetClassifier(num_classes=5, width=8, stage_sizes=(1, 1),
                                             input_pool=2)
  rng = np.random.RandomState(7)
  images = rng.uniform(-1, 1, size=(3, 16, 16, 3)).astype(np.float32)
  averaged = images.reshape(3, 8, 2, 8, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(pooled_model.apply(variables, images),
                             model.apply(variables, averaged), rtol=1e-5, atol=1e-5)
