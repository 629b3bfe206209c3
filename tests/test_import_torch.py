"""Round trip of `python -m vqvae2_jax.import_torch` against the public PyTorch models.

Tiny public VQ-VAE and PixelSNAILs are built in torch from the public architecture
(benchmarks/torch_reference.py, public widths), every weight and buffer randomised, saved
with torch.save as the public scripts save them (a bare state dict; {'model': ...,
'args': Namespace} in both serialization layouts), imported with the CLI's function, and
compared: codes of the demo photographs equal to torch's `encode` (ties aside),
reconstructions and prior logits within float tolerance; then the extract and prior stages
run on the imported workdir.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference models are PyTorch modules")

import vqvae2_jax  # pylint: disable=g-import-not-at-top
from helpers import ROOT, load_config  # pylint: disable=g-import-not-at-top
from vqvae2_jax import images as image_lib  # pylint: disable=g-import-not-at-top
from vqvae2_jax import import_torch  # pylint: disable=g-import-not-at-top
from vqvae2_jax import main  # pylint: disable=g-import-not-at-top
from vqvae2_jax.data import demo  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import torch_reference  # noqa: E402  pylint: disable=g-import-not-at-top

# One worker runs the module, so its tests share the imported workdir and its Run.
pytestmark = pytest.mark.xdist_group("import_torch")
SIZE = 64             # demo image side: top codes 8x8, bottom 16x16
K, D, C = 32, 8, 16   # codes, code dim, hidden channels
TOP = dict(shape=(8, 8), n_class=K, channel=16, kernel_size=5, n_block=2, n_res_block=1,
           res_channel=8, dropout=0.1, n_out_res_block=1, public_widths=True)
BOTTOM = dict(shape=(16, 16), n_class=K, channel=16, kernel_size=5, n_block=2, n_res_block=2,
              res_channel=8, attention=False, dropout=0.1, n_cond_res_block=2,
              cond_res_channel=8, public_widths=True)


def _randomize(module: torch.nn.Module, seed: int) -> None:
  """Every parameter and buffer (the coordinate background aside) drawn at random, at a
  scale that keeps activations O(1); cluster sizes positive as after training."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
      if name.endswith("background"):
        continue
      if name.endswith("cluster_size"):
        p.copy_(torch.rand(p.shape, generator=g) * 5 + 0.1)
      elif name.endswith("weight_g"):
        p.copy_(torch.rand(p.shape, generator=g) + 0.5)
      else:
        fan_in = max(1, p[0].numel()) if p.dim() > 1 else 4
        p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def _spread_codebooks(vq, images, seed: int) -> None:
  """Each codebook set to encoder outputs of `images` [B, 3, H, W] (plus noise), so real
  images use many codes as after training; embed_avg stays random (a buffer of its own)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    latents = vq.encode(images, return_latents=True)[-1]
    for quantize, z in zip((vq.quantize_t, vq.quantize_b), latents):
      z = z.reshape(-1, quantize.dim)
      rows = torch.randperm(len(z), generator=g)[:quantize.n_embed]
      noise = 0.1 * z.std() * torch.randn(quantize.n_embed, quantize.dim, generator=g)
      quantize.embed.copy_((z[rows] + noise).T)


def _photos(n: int = 8) -> np.ndarray:
  """n real photographs, centre-cropped and strided down to uint8 [n, 64, 64, 3]."""
  out = []
  for photo in demo.load_photos()[1][:n]:
    side = min(photo.shape[:2]) // SIZE * SIZE
    h0, w0 = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
    step = side // SIZE
    out.append(photo[h0:h0 + side:step, w0:w0 + side:step][:SIZE, :SIZE])
  return np.stack(out)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """(workdir, torch vqvae, top prior, bottom prior), imported through the CLI function."""
  folder = tmp_path_factory.mktemp("public")
  vq = torch_reference.TorchVQVAE(channel=C, n_res_block=2, n_res_channel=8, embed_dim=D,
                                  n_embed=K)
  top = torch_reference.TorchPixelSNAIL(**TOP)
  bottom = torch_reference.TorchPixelSNAIL(**BOTTOM)
  for seed, m in enumerate((vq, top, bottom)):
    _randomize(m, seed)
    m.eval()
  _spread_codebooks(vq, _torch_images(_photos()), seed=3)
  paths = {name: str(folder / f"{name}.pt") for name in ("vqvae", "top", "bottom")}
  torch.save(vq.state_dict(), paths["vqvae"])  # as vqvae_560.pt: a bare state dict
  for name, model, zip_layout in (("top", top, False), ("bottom", bottom, True)):
    args = argparse.Namespace(hier=name, channel=16, n_res_block=TOP["n_res_block"],
                              n_res_channel=8, dropout=0.1, sched=None, path="lmdb")
    torch.save({"model": model.state_dict(), "args": args}, paths[name],
               _use_new_zipfile_serialization=zip_layout)
  workdir = str(folder / "run")
  assert import_torch.main([f"--vqvae={paths['vqvae']}", f"--prior-top={paths['top']}",
                            f"--prior-bottom={paths['bottom']}", f"--workdir={workdir}",
                            f"--image-size={SIZE}"]) == 0
  return workdir, vq, top, bottom


@pytest.fixture(scope="module")
def run(imported):
  """One Run for the read-only tests, so its compiled functions are shared."""
  return vqvae2_jax.load(imported[0])


def _torch_images(images: np.ndarray):
  return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _assert_codes_equal_but_ties(ours: np.ndarray, theirs: np.ndarray, z, quantize):
  """Codes equal wherever torch's nearest code is not a float tie with ours."""
  with torch.no_grad():
    dist = quantize.distances(z).numpy()
  ours, theirs = ours.reshape(-1), theirs.reshape(-1)
  rows = np.nonzero(ours != theirs)[0]
  gaps = np.abs(dist[rows, ours[rows]] - dist[rows, theirs[rows]])
  scale = np.abs(dist[rows, theirs[rows]]) + 1.0
  assert np.all(gaps <= 1e-5 * scale), f"{len(rows)} codes differ, gaps {gaps[:5]}"
  return len(rows)


def test_encode_decode_and_reconstruct_equal_torch(imported, run):
  _, vq, _, _ = imported
  images = _photos()
  codes = run.encode(images)
  with torch.no_grad():
    *_, id_t, id_b, (z_t, z_b) = vq.encode(_torch_images(images), return_latents=True)
    want = vq.decode_code(id_t, id_b).permute(0, 2, 3, 1).numpy()
  ties = (_assert_codes_equal_but_ties(codes[0], id_t.numpy(), z_t, vq.quantize_t)
          + _assert_codes_equal_but_ties(codes[1], id_b.numpy(), z_b, vq.quantize_b))
  assert ties <= 4 and len(np.unique(codes[1])) > K // 2  # real images use many codes
  model, variables = run.vqvae
  got = np.asarray(model.apply(variables, (id_t.numpy(), id_b.numpy()),
                               method=model.decode_codes))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
  recon = run.reconstruct(images)
  assert recon.shape == images.shape and recon.dtype == np.uint8


def test_a_codebook_ema_step_equals_the_public_quantizers(imported, run):
  _, vq, _, _ = imported
  images = _photos()
  model, variables = run.vqvae
  _, updated = model.apply(variables, image_lib.to_model(images), train=True,
                           mutable=["vq_stats"])
  vq = copy.deepcopy(vq).train()
  with torch.no_grad():
    vq.encode(_torch_images(images))
  for level, quantize in enumerate((vq.quantize_t, vq.quantize_b)):
    ours = updated["vq_stats"][f"quantizers_{level}"]
    np.testing.assert_allclose(ours["ema_count"], quantize.cluster_size.numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours["ema_sum"], quantize.embed_avg.numpy().T, atol=1e-5)
    np.testing.assert_allclose(ours["codebook"], quantize.embed.numpy().T, atol=1e-4,
                               rtol=1e-4)


def test_prior_logits_equal_torch(imported, run):
  _, vq, top, bottom = imported
  with torch.no_grad():
    *_, id_t, id_b = vq.encode(_torch_images(_photos()))
    want_top = top(id_t).permute(0, 2, 3, 1).numpy()
    want_bottom = bottom(id_b, condition=id_t).permute(0, 2, 3, 1).numpy()
  for level, codes, cond, want in (("top", id_t, (), want_top),
                                   ("bottom", id_b, (id_t.numpy(),), want_bottom)):
    prior, params = run.prior(level)
    got = np.asarray(prior.apply({"params": params}, codes.numpy(), cond, None, train=False))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=level)


def test_imported_priors_sample_and_compress(run):
  samples, (top, bottom) = run.sample(2, seed=0, return_codes=True)
  assert samples.shape == (2, SIZE, SIZE, 3) and top.shape == (2, 8, 8)
  assert bottom.shape == (2, 16, 16) and len(np.unique(bottom)) > 1
  images = _photos(2)
  streams = run.compress(images)
  np.testing.assert_array_equal(run.decompress(streams), run.reconstruct(images))
  bits = run.log_prob(images)["bits"]
  assert bits.shape == (2,) and np.all(np.isfinite(bits)) and np.all(bits > 0)
  payload = np.array([len(s) for s in streams]) * 8
  assert np.all(payload >= bits) and np.all(payload < bits + 400)  # header + termination


def test_extract_and_a_prior_step_run_on_the_imported_workdir(imported):
  workdir, *_ = imported
  main.run_stage(load_config("demo", "extract,tiny"), workdir)
  manifest = json.load(open(os.path.join(workdir, "extract", "manifest.json")))
  assert manifest["shapes"] == {"top": [8, 8], "bottom": [16, 16]} and manifest["splits"]
  before = vqvae2_jax.load(workdir).prior("top")[1]
  # The prior stage resumes the imported prior (step 0) and trains it one step further,
  # with the optimizer fields it was imported with (Adam, parameter EMA 0.999).
  main.run_stage(load_config("demo", "prior_top,tiny", **{
      "priors.top.train.steps": 1, "priors.top.train.param_ema_decay": 0.999}), workdir)
  after = vqvae2_jax.load(workdir).prior("top")[1]
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       before, after)
  assert 0 < max(jax.tree.leaves(moved)) < 1.0


def test_files_of_another_architecture_are_refused_naming_the_file(tmp_path):
  vq = torch_reference.TorchVQVAE(channel=C, n_res_block=1, n_res_channel=8, embed_dim=D,
                                  n_embed=K)
  sd = vq.state_dict()
  del sd["dec.blocks.0.weight"]
  path = tmp_path / "broken.pt"
  torch.save(sd, path)
  with pytest.raises(import_torch.TorchImportError, match=r"broken\.pt.*dec\.blocks\.0"):
    import_torch.import_checkpoints(str(tmp_path / "w"), str(path), image_size=SIZE)
  top = torch_reference.TorchPixelSNAIL(**TOP)
  torch.save({"model": top.state_dict(), "args": argparse.Namespace(hier="bottom")},
             tmp_path / "top.pt")
  torch.save(vq.state_dict(), tmp_path / "vq.pt")
  with pytest.raises(import_torch.TorchImportError, match="trained as the 'bottom' prior"):
    import_torch.import_checkpoints(str(tmp_path / "w2"), str(tmp_path / "vq.pt"),
                                    {"top": str(tmp_path / "top.pt")}, image_size=SIZE)
  with pytest.raises(import_torch.TorchImportError, match="image-size"):
    import_torch.import_checkpoints(str(tmp_path / "w3"), str(tmp_path / "vq.pt"),
                                    {"bottom": str(tmp_path / "top.pt")}, image_size=128)
