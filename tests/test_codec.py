"""The image codec: frequencies, stream format, bit-exact round trips, rate vs NLL, CLI."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

import vqvae2_jax
from vqvae2_jax import codec, parallel
from vqvae2_jax.codec import coder, frequencies, stream
from vqvae2_jax.models.prior import PixelSNAILPrior
from vqvae2_jax.sampling import incremental

from helpers import ROOT, numpy_params

K = 16


def _prior(levels_above=0, num_classes=0, attention=1):
  return PixelSNAILPrior(num_codes=K, hidden=16, res_hidden=16, num_layers=2,
                         attention_every=attention, num_heads=2, kernel_size=3,
                         num_output_layers=1, num_cond_layers=1 if levels_above else 0,
                         num_cond_levels=levels_above,
                         cond_scales=tuple(2**(levels_above - u) for u in range(levels_above)),
                         num_classes=num_classes)


def _models(num_levels=2, num_classes=0, batch_size=4, seed=0, fingerprint=b"\x01" * 8,
            loop=None):
  """Untrained priors over 4x4 / (8x8) / 16x16 maps, params drawn with NumPy."""
  names = {2: ("top", "bottom"), 3: ("top", "mid", "bottom")}[num_levels]
  shapes = {n: (4 * 2**i, 4 * 2**i) for i, n in enumerate(names)}
  priors = {}
  for i, n in enumerate(names):
    prior = _prior(i, num_classes, attention=0 if i else 1)
    cond = tuple(jnp.zeros((1, *shapes[u]), jnp.int32) for u in names[:i])
    labels = jnp.zeros((1,), jnp.int32) if num_classes else None
    params = numpy_params(prior, jnp.zeros((1, *shapes[n]), jnp.int32), cond, labels,
                          seed + i)
    priors[n] = (prior, params)
  return codec.CodecModels(priors=priors, shapes=shapes, image_size=8 * shapes[names[-1]][0],
                           num_codes=K, fingerprint=fingerprint, batch_size=batch_size,
                           loop=loop)


def _codes(models, n, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(rng.integers(0, K, (n,) + models.shapes[l]).astype(np.int32)
               for l in models.levels)


def _sampled_codes(models, labels, seed=0):
  """Codes drawn from the priors themselves (typical codes, as a trained prior sees)."""
  rng, out = jax.random.PRNGKey(seed), []
  labels = None if labels is None else jnp.asarray(labels, jnp.int32)
  for level in models.levels:
    prior, params = models.priors[level]
    out.append(incremental.sample_incremental(
        prior, params, jax.random.fold_in(rng, len(out)),
        shape=(len(labels),) + models.shapes[level], cond_codes=tuple(out), labels=labels))
  return tuple(np.asarray(c) for c in out)


def _assert_same_codes(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------- frequencies
def test_quantize_keeps_every_code_and_sums_to_the_total():
  rng = np.random.default_rng(0)
  logits = (rng.standard_normal((64, 37)) * 8).astype(np.float32)
  logits[0, :5] = -np.inf  # masked codes still get one unit
  logits[1] = 0.0          # uniform: ties broken by index, deterministically
  logits[2, 3] = 80.0      # one code takes nearly everything
  f = frequencies.quantize(logits)
  assert f.dtype == np.int64 and f.shape == (64, 37)
  np.testing.assert_array_equal(f.sum(1), frequencies.TOTAL)
  assert f.min() == 1 and (f[0, :5] == 1).all()
  assert f[1].max() - f[1].min() <= 1
  assert f[2, 3] == frequencies.TOTAL - 36
  np.testing.assert_array_equal(f, frequencies.quantize(logits.copy()))
  # Close to the float probabilities (within a unit plus the one-unit floor).
  p = np.exp(logits[3] - logits[3].max())
  p /= p.sum()
  assert np.abs(f[3] - p * (frequencies.TOTAL - 37)).max() <= 2.0


def test_constriction_codes_with_exactly_our_frequencies():
  """Code lengths equal -log2(f / 2^24) of our integer frequencies (plus termination):
  constriction's own quantization would spend measurably more on rare symbols."""
  rng = np.random.default_rng(1)
  n = 3000
  logits = (rng.standard_normal((n, K)) * 4).astype(np.float32)
  freqs = frequencies.quantize(logits)
  symbols = rng.integers(0, K, n).astype(np.int32)  # often improbable ones
  enc = coder.constriction.stream.queue.RangeEncoder()
  enc.encode(symbols, coder._FAMILY, frequencies.coder_weights(freqs))
  ideal = frequencies.code_length_bits(freqs, symbols).sum()
  bits = 32 * len(enc.get_compressed())
  assert ideal <= bits <= ideal + 64, (bits, ideal)
  # Frequency 2 exactly: 23 bits per symbol.
  weights = np.zeros((500, K), np.float32)
  weights[:, 0] = frequencies.TOTAL - K - 1
  weights[:, 5] = 1.0
  enc = coder.constriction.stream.queue.RangeEncoder()
  enc.encode(np.full(500, 5, np.int32), coder._FAMILY, weights)
  assert 500 * 23 <= 32 * len(enc.get_compressed()) <= 500 * 23 + 64


# --------------------------------------------------------------------- stream format
def _header(**kw):
  base = dict(image_size=32, num_codes=K, batch_size=4, row=2, fingerprint=b"abcdefgh",
              codes_crc=123, label=7, shapes=((4, 4), (8, 8)))
  return stream.Header(**{**base, **kw})


def test_stream_roundtrip_and_every_bit_flip_is_refused():
  header = _header()
  payload = np.arange(5, dtype=np.uint32) * 977
  data = stream.pack(header, payload)
  assert len(data) == header.size_bytes + 4 * 5 == 45 + 20
  back, words = stream.unpack(data)
  assert back == header
  np.testing.assert_array_equal(words, payload)
  assert stream.unpack(stream.pack(_header(label=None), payload))[0].label is None
  for i in range(len(data)):
    for bit in (0, 5):
      flipped = bytearray(data)
      flipped[i] ^= 1 << bit
      with pytest.raises(stream.StreamError):
        stream.unpack(bytes(flipped))
  for cut in (0, 3, 10, 30, len(data) - 1):
    with pytest.raises(stream.StreamError, match="truncated|not a vqvae2_jax|version"):
      stream.unpack(data[:cut])
  with pytest.raises(stream.StreamError, match="not a vqvae2_jax codec stream"):
    stream.unpack(b"\x89PNG\r\n\x1a\n" + data)


def test_fingerprint_sees_config_and_every_parameter():
  tree = {"a": np.ones((3, 2), np.float32), "b": {"c": np.zeros(4, np.float32)}}
  fp = stream.fingerprint({"hidden": 16}, [tree])
  assert len(fp) == 8 and fp == stream.fingerprint({"hidden": 16}, [tree])
  assert fp != stream.fingerprint({"hidden": 17}, [tree])
  other = {"a": tree["a"].copy(), "b": {"c": tree["b"]["c"].copy()}}
  other["b"]["c"][2] = 1e-30
  assert fp != stream.fingerprint({"hidden": 16}, [other])


# --------------------------------------------------------------------- round trips
@pytest.mark.parametrize("num_levels,num_classes", [(2, 3), (3, 0)])
def test_round_trip_is_bit_exact_across_batch_positions(num_levels, num_classes):
  models = _models(num_levels, num_classes, batch_size=4)
  codes = _codes(models, 6)
  labels = np.array([0, 1, 2, 0, 1, 2]) if num_classes else None
  streams, _ = codec.compress_codes(models, codes, labels)
  headers = [stream.unpack(s)[0] for s in streams]
  # One batch size for every call (the last batch padded): one compiled loop.
  assert [(h.batch_size, h.row) for h in headers] == [(4, 0), (4, 1), (4, 2), (4, 3),
                                                      (4, 0), (4, 1)]
  # Decoded out of order, mixed across compress batches: each stream finds its row.
  order = [5, 2, 0, 4, 3, 1]
  out, out_labels = codec.decompress_codes(models, [streams[i] for i in order])
  _assert_same_codes(out, tuple(c[order] for c in codes))
  if num_classes:
    np.testing.assert_array_equal(out_labels, labels[order])
  else:
    assert out_labels is None
  # One stream alone, from a middle row of its batch (the other rows are padding).
  alone, _ = codec.decompress_codes(models, [streams[2]])
  _assert_same_codes(alone, tuple(c[2:3] for c in codes))


def test_single_image_and_class_changes_the_stream():
  models = _models(2, 3, batch_size=4)
  codes = _codes(models, 1, seed=3)
  s0, _ = codec.compress_codes(models, codes, [0])
  s2, _ = codec.compress_codes(models, codes, [2])
  assert stream.unpack(s0[0])[0].batch_size == 1 and s0 != s2
  for s, label in ((s0, 0), (s2, 2)):
    out, lab = codec.decompress_codes(models, s)
    _assert_same_codes(out, codes)
    assert lab.tolist() == [label]
  with pytest.raises(ValueError, match="class-conditional"):
    codec.compress_codes(models, codes)
  with pytest.raises(ValueError, match=r"0\.\.2"):
    codec.compress_codes(models, codes, [3])


def test_payload_bits_match_the_teacher_forced_nll():
  """Rate equals NLL: payload within 1% (+ 64 bits of coder termination) of the priors'
  teacher-forced code length of those codes."""
  models = _models(2, 3, batch_size=4)
  labels = np.array([2, 0, 1, 1])
  codes = _sampled_codes(models, labels)
  streams, quantized_bits = codec.compress_codes(models, codes, labels)
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)),
                            jax.devices()[:1])
  with parallel.use_mesh(mesh, ()):
    nll = codec.make_level_bits_fn(models.priors)(*map(jnp.asarray, codes),
                                                  jnp.asarray(labels))
  nll = np.sum([np.asarray(b, np.float64) for b in nll], axis=0)
  for i, s in enumerate(streams):
    header, payload = stream.unpack(s)
    payload_bits = 32 * payload.size
    assert len(s) == header.size_bytes + 4 * payload.size
    assert abs(payload_bits - nll[i]) <= 0.01 * nll[i] + 64, (payload_bits, nll[i])
    ideal = sum(quantized_bits[l][i] for l in models.levels)
    assert ideal <= payload_bits <= ideal + 64
    assert abs(ideal - nll[i]) <= 1e-3 * nll[i]  # quantization to 2^24 costs ~nothing
  # The priors are far from uniform over these codes: the test has something to measure.
  latents = sum(np.prod(models.shapes[l]) for l in models.levels)
  assert nll.mean() < 0.8 * latents * np.log2(K), nll / latents


@dataclasses.dataclass(frozen=True)
class _Perturbed:
  """A choice seeing slightly different logits: a decoder on 'another platform'."""
  inner: object

  def __call__(self, p, logits):
    return self.inner(p, logits + 0.3 * jnp.sin(logits * 7.0 + p))


def _perturbed_loop(*args, choose, **kwargs):
  return incremental.run_incremental(*args, choose=_Perturbed(choose), **kwargs)


def test_foreign_truncated_corrupted_streams_and_other_probabilities_are_refused():
  models = _models(2, 3, batch_size=4)
  codes = _codes(models, 2, seed=7)
  streams, _ = codec.compress_codes(models, codes, [1, 2])
  other = _models(2, 3, batch_size=4, fingerprint=b"\x02" * 8)
  with pytest.raises(stream.ModelMismatchError, match="other models.*fingerprint"):
    codec.decompress_codes(other, streams)
  with pytest.raises(stream.StreamError, match="truncated"):
    codec.decompress_codes(models, [streams[0][:-9]])
  flipped = bytearray(streams[1])
  flipped[len(flipped) // 2] ^= 0x10
  with pytest.raises(stream.StreamError, match="stream 0 is corrupted"):
    codec.decompress_codes(models, [bytes(flipped)])
  unconditional = _models(2, 0, batch_size=4)
  unconditional.fingerprint = models.fingerprint
  with pytest.raises(stream.ModelMismatchError, match="carries a class label"):
    codec.decompress_codes(unconditional, streams)
  drifted = dataclasses.replace(models, loop=_perturbed_loop)
  with pytest.raises(stream.StreamError, match="fail the stream's checksum"):
    codec.decompress_codes(drifted, streams)


# --------------------------------------------------------------------- trained run
def _val_images(run, n):
  from vqvae2_jax.data.sources import make_source  # pylint: disable=g-import-not-at-top
  source = make_source(run.config.data, "val")
  return np.stack([source.get(i)[0] for i in range(n)])


@pytest.mark.xdist_group("tiny_pipeline")
def test_trained_run_round_trip_equals_reconstruct(tiny_pipeline):
  run = vqvae2_jax.load(tiny_pipeline)
  images = _val_images(run, 3)
  streams = run.compress(images, batch_size=2)
  assert len(streams) == 3 and all(isinstance(s, bytes) for s in streams)
  out, codes, labels = run.decompress(streams, return_codes=True)
  np.testing.assert_array_equal(out, run.reconstruct(images))
  _assert_same_codes(codes, run.encode(images))
  # Unlabelled compression picks each image's cheapest class: the header's label.
  lp = run.log_prob(images)
  np.testing.assert_array_equal(labels, lp["label"])
  # Rate vs NLL with the trained priors, under the labels the streams carry.
  given = run.log_prob(images, labels)
  for i, s in enumerate(streams):
    payload_bits = 32 * stream.unpack(s)[1].size
    assert abs(payload_bits - given["bits"][i]) <= 0.01 * given["bits"][i] + 64
  # The mixture over classes costs more than the best class, by at most log2(C) bits.
  assert (lp["bits"] >= given["bits"] - 1e-6).all()
  assert (lp["bits"] <= given["bits"] + np.log2(run.num_classes) + 1e-6).all()
  np.testing.assert_allclose(lp["bits_per_pixel"], lp["bits"] / images.shape[1]**2)
  np.testing.assert_allclose(sum(given["levels"].values()), given["bits"])


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "vqvae2_jax.codec", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.xdist_group("tiny_pipeline")
def test_cli_end_to_end_on_two_pngs(tiny_pipeline, tmp_path):
  run = vqvae2_jax.load(tiny_pipeline)
  images = _val_images(run, 2)
  size = images.shape[1]
  paths = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
  Image.fromarray(images[0]).save(paths[0])
  # A larger image: resized (short side) and centre-cropped, as the data pipeline does.
  big = np.asarray(Image.fromarray(images[1]).resize((2 * size, 3 * size)))
  Image.fromarray(big).save(paths[1])
  (tmp_path / "junk.png").write_bytes(b"not an image")
  w = f"--workdir={tiny_pipeline}"
  r = _cli("compress", w, *paths, str(tmp_path / "missing.png"), f"--out={tmp_path}/z")
  assert r.returncode == 1 and "missing.png: no such image file" in r.stderr, r.stderr
  r = _cli("compress", w, *paths, str(tmp_path / "junk.png"), f"--out={tmp_path}/z",
           "--on_bad_input=skip", "--batch_size=2")
  assert r.returncode == 0, r.stderr
  assert "junk.png: cannot be read as an image" in r.stderr
  assert f"resized to {size}x{size}" in r.stdout and "compressed 3/3" in r.stdout
  zs = sorted(str(p) for p in (tmp_path / "z").iterdir())
  assert [os.path.basename(p) for p in zs] == ["a.vq2c", "b.vq2c"]
  # A corrupted stream among good ones: named, left out under --on_bad_input=skip.
  bad = bytearray(open(zs[0], "rb").read())
  bad[-10] ^= 1
  (tmp_path / "bad.vq2c").write_bytes(bytes(bad))
  r = _cli("decompress", w, *zs, str(tmp_path / "bad.vq2c"), f"--out={tmp_path}/png",
           "--on_bad_input=skip")
  assert r.returncode == 0, r.stderr
  assert "bad.vq2c is corrupted" in r.stderr, r.stderr
  from vqvae2_jax.codec import files  # pylint: disable=g-import-not-at-top
  expected = run.reconstruct(np.stack([files.read_image(p, size)[0] for p in paths]))
  assert sorted(os.listdir(tmp_path / "png")) == ["a.png", "b.png"]
  for name, want in zip(("a.png", "b.png"), expected):
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "png" / name)), want)
  r = _cli("likelihood", w, *paths, "--label=0", f"--json={tmp_path}/bits.json")
  assert r.returncode == 0, r.stderr
  assert "bits_per_pixel" in r.stdout and "not a pixel likelihood" in r.stdout
  rows = json.load(open(tmp_path / "bits.json"))["images"]
  want = run.log_prob(np.stack([files.read_image(p, size)[0] for p in paths]), 0)["bits"]
  np.testing.assert_allclose([row["bits"] for row in rows], want, rtol=1e-5)


# --------------------------------------------------------------------- rate-distortion
def test_rate_distortion_of_a_lossless_codec_and_the_references():
  from vqvae2_jax.eval import rate_distortion as rd  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = (rng.random((3, 32, 32, 3)) * 64 + np.linspace(0, 160, 32)[None, :, None, None]
            ).astype(np.uint8)
  result = rd.rate_distortion(
      images, lambda x: [im.tobytes() for im in x],
      lambda s: np.stack([np.frombuffer(b, np.uint8).reshape(32, 32, 3) for b in s]),
      latents_per_image=80, num_codes=16, header_bytes=0,
      options=rd.RateDistortionOptions(jpeg_qualities=(10, 50, 95),
                                       webp_qualities=(10, 50, 95)),
      code_length_bits=lambda s: np.full(len(s), 8.0 * 32 * 32 * 3))
  rows = {r["method"].split(" (")[0]: r for r in result["rows"]}
  assert rows["codec"]["bpp"] == 24.0 and rows["codec"]["psnr"] == float("inf")
  assert rows["codec"]["ssim"] == 1.0
  assert rows["raw indices"]["bpp"] == 80 * 4 / 32**2
  for name in ("jpeg", "webp"):
    c = result["curves"][name]
    assert c["bpp"] == sorted(c["bpp"]) and c["psnr"] == sorted(c["psnr"])  # monotone
    matched = rows[f"{name.upper()} at matched bpp"]
    assert matched["bpp"] == pytest.approx(max(c["bpp"]), rel=0.2)  # closest to 24 bpp
  # No lossy setting reaches infinite PSNR.
  assert rows["JPEG at the codec's PSNR"]["images_reached"] == 0
  assert result["rate_vs_nll"]["mean_gap"] == 0.0
  np.testing.assert_allclose(rd.psnr(images, images ^ 1).min(),
                             10 * np.log10(255**2 / 1.0), atol=1e-3)
  assert "| codec (priors + range coder) | 24.0000 |" in rd.render_markdown(result)


@pytest.mark.xdist_group("tiny_pipeline")
def test_bench_codec_runs_on_the_tiny_pipeline(tiny_pipeline, tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import bench_codec  # pylint: disable=g-import-not-at-top
  result = bench_codec.main([f"--workdir={tiny_pipeline}", f"--out={tmp_path}",
                             "--num_images=4", "--batch_size=2"])
  assert (tmp_path / "rate_distortion.png").is_file()
  assert "JPEG at matched bpp" in (tmp_path / "report.md").read_text()
  gap = result["rate_vs_nll"]
  assert abs(gap["payload_bits"] - gap["nll_bits"]) <= 0.01 * gap["nll_bits"] + 64
  assert result["speed"]["decompress_images_per_s"] > 0
