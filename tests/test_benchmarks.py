"""Smoke tests of benchmarks/: both scripts run end to end at tiny sizes (no timing checks),
and the PyTorch reference matches the JAX model where the comparison relies on it."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae2_jax.models import quantizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_prior  # noqa: E402  pylint: disable=g-import-not-at-top
import bench_vqvae  # noqa: E402  pylint: disable=g-import-not-at-top

try:
  import torch  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top
except ImportError:
  torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")


def _check_vqvae_rows(rows, expect_torch: bool):
  assert [r["framework"] for r in rows] == (["torch"] if expect_torch else []) + ["jax"]
  for r in rows:
    assert set(r["per_sec"]) == {"train", "encode", "decode"}
    assert all(np.isfinite(v) and v > 0 for v in r["per_sec"].values())
    assert r["params"] > 0
  jax_row = rows[-1]
  f = jax_row["flops_per_image"]
  # The train step holds a forward pass, its backward and Adam: more work than coding.
  assert f["train"] > f["encode"] > 0 and f["train"] > f["decode"] > 0


def test_bench_vqvae_tiny():
  argv = ["--presets", "tiny", "--upsample", "subpixel", "--batch", "2", "--steps", "1",
          "--warmup", "0"] + (["--torch"] if torch is not None else [])
  rows = bench_vqvae.main(argv)
  _check_vqvae_rows(rows, torch is not None)


@needs_torch
def test_bench_vqvae_peer_src_imports_the_given_checkout(tmp_path, capsys):
  """--peer-src imports <PATH>/vqvae.py (which imports its own top-level `distributed`
  package, as the public code does), times it beside the others and takes the ratios
  against it; a PATH without vqvae.py is skipped with a note."""
  (tmp_path / "distributed").mkdir()
  (tmp_path / "distributed" / "__init__.py").write_text("MARK = 'peer'\n")
  # A stand-in for the public model: the reference class, built through the checkout.
  (tmp_path / "vqvae.py").write_text(
      "import distributed\nfrom torch_reference import TorchVQVAE\n"
      "assert distributed.MARK == 'peer'\n"
      "class VQVAE(TorchVQVAE):\n  pass\n")
  argv = ["--presets", "tiny", "--upsample", "subpixel", "--batch", "2", "--steps", "1",
          "--warmup", "0", "--torch", "--peer-src", str(tmp_path)]
  try:
    rows = bench_vqvae.main(argv)
  finally:
    sys.modules.pop("distributed", None)  # the stand-in package, not a real one
  assert [r["name"] for r in rows] == [bench_vqvae.PEER_NAME, "torch (public arch)",
                                       "jax subpixel"]
  assert rows[0]["params"] == rows[1]["params"]
  out = capsys.readouterr().out
  assert f"ratio jax subpixel / {bench_vqvae.PEER_NAME}:" in out
  assert str(tmp_path) not in sys.path  # the checkout does not stay importable
  assert bench_vqvae.load_peer_vqvae(str(tmp_path / "missing")) is None
  assert "holds no vqvae.py" in capsys.readouterr().out


def test_bench_prior_tiny():
  argv = ["--only", "demo_bottom", "top85m", "--demo-presets", "tiny", "--batch", "2",
          "--demo-batch", "2", "--top-size", "4", "--matched-hidden", "16",
          "--matched-layers", "2", "--matched-attention-every", "1", "--steps", "1",
          "--warmup", "0"]
  if torch is not None:
    argv += ["--torch", "--torch-channel", "16", "--torch-blocks", "1", "--torch-res-blocks", "1"]
  rows = bench_prior.main(argv)
  names = [r["name"] for r in rows]
  assert names[0] == "demo_bottom" and names[-1] == "top85m"
  for r in rows:
    assert r["s_per_step"] > 0 and r["latents_per_s"] > 0 and r["params"] > 0
  by_name = {r["name"]: r for r in rows}
  assert by_name["top85m"]["latents_per_s"] == pytest.approx(2 * 16 / by_name["top85m"]["s_per_step"])
  assert by_name["demo_bottom"]["flops"] > 0


def _jax_vqvae_param_counts(**widths) -> dict[str, int]:
  """Parameters per top-level submodule of our VQVAE2 with these widths."""
  from vqvae2_jax import builders  # pylint: disable=g-import-not-at-top
  config = bench_vqvae.load_config("demo", "vqvae")
  config.vqvae.update(widths)
  model = builders.build_vqvae(config)
  shapes = jax.eval_shape(builders.vqvae_init_fn(model, 64), jax.random.PRNGKey(0))
  return {k: bench_vqvae.count_params(v) for k, v in shapes["params"].items()}


@needs_torch
def test_matched_models_have_the_same_modules():
  """With --match-torch-reference widths and transposed convs, every module of ours has
  the size of its PyTorch counterpart except the top encoder, whose first 4x4 conv goes
  straight to `hidden` channels (the reference: hidden/2, then a 3x3 conv)."""
  w = {k: v for k, v in bench_vqvae.TORCH_REFERENCE_WIDTHS.items() if k != "beta"}
  ours = _jax_vqvae_param_counts(upsample="transpose", **w)
  ref = torch_reference.TorchVQVAE(3, w["hidden"], w["num_res_layers"], w["res_hidden"],
                                   w["code_dim"], w["num_codes"])
  theirs = {n: torch_reference.num_params(m) for n, m in ref.named_children()}
  pairs = dict(encoders_1="enc_b", cond_decoders_0="dec_t", to_bottom_0_0="upsample_t",
               decoder="dec", pre_quant_0="quantize_conv_t", pre_quant_1="quantize_conv_b")
  for mine, their in pairs.items():
    assert ours[mine] == theirs[their], (mine, ours[mine], their, theirs[their])
  c, h = w["hidden"], w["hidden"] // 2
  first_convs_ours = (16 * c * c + c) + (9 * c * c + c)    # 4x4 c->c, 3x3 c->c
  first_convs_ref = (16 * c * h + h) + (9 * h * c + c)     # 4x4 c->c/2, 3x3 c/2->c
  extra = first_convs_ours - first_convs_ref
  assert ours["encoders_0"] - theirs["enc_t"] == extra


@needs_torch
def test_torch_quantizer_matches_jax_ema_update():
  """The reference's EMA quantizer picks the same codes and codebook update as ours."""
  rng = np.random.default_rng(0)
  k, d = 16, 4
  z = rng.normal(size=(2, 3, 3, d)).astype(np.float32)
  q = torch_reference.QuantizeEMA(d, k, decay=0.9)
  codebook = q.embed.numpy().T.copy()  # [K, D]
  count0 = q.cluster_size.numpy().copy()
  sum0 = q.embed_avg.numpy().T.copy()
  q.train()
  quantized, loss, codes = q(torch.from_numpy(z))
  want_codes = quantizer.nearest_codes(jnp.asarray(z), jnp.asarray(codebook))
  np.testing.assert_array_equal(codes.numpy(), np.asarray(want_codes))
  np.testing.assert_allclose(quantized.detach().numpy(), codebook[np.asarray(want_codes)],
                             rtol=1e-5, atol=1e-6)
  _, _, new_codebook = quantizer.ema_codebook_update(
      jnp.asarray(count0), jnp.asarray(sum0), jnp.asarray(z), want_codes, 0.9, 1e-5)
  np.testing.assert_allclose(q.embed.numpy().T, np.asarray(new_codebook), rtol=1e-4, atol=1e-5)
  assert float(loss) == pytest.approx(float(np.mean((codebook[np.asarray(want_codes)] - z)**2)),
                                      rel=1e-5)


@needs_torch
def test_torch_pixelsnail_is_causal():
  """Logits at raster position p of the reference prior ignore codes at positions >= p."""
  torch.manual_seed(0)
  model = torch_reference.TorchPixelSNAIL((5, 5), 8, 16, 5, 1, 1, 8, dropout=0.0).eval()
  codes = torch.randint(0, 8, (1, 5, 5))
  changed = codes.clone()
  changed[0, 2, 2] = (changed[0, 2, 2] + 1) % 8
  with torch.no_grad():
    diff = (model(changed) - model(codes)).abs().sum(1)[0].numpy()
  affected = np.argwhere(diff > 1e-6)
  assert len(affected), "a later position should see the change"
  assert all(i * 5 + j > 2 * 5 + 2 for i, j in affected)
