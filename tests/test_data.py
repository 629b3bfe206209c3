"""Tests for vqvae2_jax.data: demo / folder / tfds sources and the batch loader."""
from __future__ import annotations

import json
import os

import grain
import ml_collections
import numpy as np
from PIL import Image
import pytest

from vqvae2_jax.data import demo
from vqvae2_jax.data.folders import FolderSource
from vqvae2_jax.data.loader import BatchLoader, iterate_once
from vqvae2_jax.data.sources import DataError, ImageSource, make_source

S = 16


def _cfg(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(dict(
      source="demo", image_size=S, root="", layout="classes",
      train_split="train", val_split="val", flat_val_count=2,
      tfds_name="imagenet2012", tfds_data_dir="", on_bad_image="error",
      demo_train_size=64, demo_val_size=40, seed=0))
  c.update(overrides)
  return c


# ----------------------------------------------------------------- demo source


def test_demo_shapes_labels_and_names():
  train, val = make_source(_cfg(), "train"), make_source(_cfg(), "val")
  assert isinstance(train, ImageSource)
  assert len(train) == 64 and len(val) == 40
  names, photos = demo.load_photos()
  assert train.num_classes == len(train.class_names) == len(photos) >= 10
  assert {"astronaut", "chelsea", "china", "flower"} <= set(train.class_names)
  assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 for p in photos)
  for src in (train, val):
    for i in (0, 1, 17, len(src) - 1):
      img, label = src.get(i)
      assert img.shape == (S, S, 3) and img.dtype == np.uint8
      assert label == i % src.num_classes
    assert src.num_skipped == 0
  with pytest.raises(IndexError):
    train.get(64)


def test_demo_determinism_across_instances_epochs_and_seeds():
  a = make_source(_cfg(), "train")
  b = make_source(_cfg(), "train")
  other_seed = make_source(_cfg(seed=1), "train")
  differ_epoch = differ_seed = 0
  for i in range(20):
    img0 = a.get(i, epoch=0)[0]
    np.testing.assert_array_equal(img0, b.get(i, epoch=0)[0])
    np.testing.assert_array_equal(a.get(i, epoch=3)[0], b.get(i, epoch=3)[0])
    differ_epoch += a.crop_box(i, 0) != a.crop_box(i, 1)
    differ_epoch += not np.array_equal(img0, a.get(i, epoch=1)[0])
    differ_seed += not np.array_equal(img0, other_seed.get(i, epoch=0)[0])
  assert differ_epoch == 40 and differ_seed == 20
  val = make_source(_cfg(), "val")
  val_other_seed = make_source(_cfg(seed=5), "val")
  for j in range(0, 40, 7):
    np.testing.assert_array_equal(val.get(j, epoch=0)[0], val.get(j, epoch=9)[0])
    np.testing.assert_array_equal(val.get(j)[0], val_other_seed.get(j)[0])


def test_demo_val_strip_is_disjoint_from_every_train_crop():
  train = demo.DemoSource(S, 300, seed=3)
  val = demo.DemoSource(S, 40, is_val=True)
  _, photos = demo.load_photos()
  train_right = {}
  for epoch in range(3):
    for i in range(len(train)):
      box = train.crop_box(i, epoch)
      h, w = photos[box.photo].shape[:2]
      x_split = demo.train_width(w)
      assert 0 <= box.x0 and box.x0 + box.side <= x_split
      assert 0 <= box.y0 and box.y0 + box.side <= h
      short = min(x_split, h)
      assert 0.35 * short - 1 <= box.side <= 0.9 * short
      train_right[box.photo] = max(train_right.get(box.photo, 0), box.x0 + box.side)
  for j in range(len(val)):
    box = val.crop_box(j)
    h, w = photos[box.photo].shape[:2]
    assert box.x0 >= demo.train_width(w) >= train_right.get(box.photo, 0)
    assert box.x0 + box.side <= w and box.y0 + box.side <= h and not box.flip
  # get() really shows the box's pixels (flipped when the box says so).
  for i in range(6):
    box = train.crop_box(i, 2)
    crop = photos[box.photo][box.y0:box.y0 + box.side, box.x0:box.x0 + box.side]
    ref = np.asarray(Image.fromarray(crop).resize((S, S), Image.Resampling.BICUBIC))
    ref = ref[:, ::-1] if box.flip else ref
    err = np.abs(train.get(i, 2)[0].astype(int) - ref).mean()
    assert err < 2.0, (i, box, err)


# --------------------------------------------------------------- folder source


def _save(path, array, mode=None, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = Image.fromarray(np.asarray(array, np.uint8))
  if mode:
    img = img.convert(mode)
  img.save(path, format=fmt)


def _solid(h, w, rgb):
  return np.broadcast_to(np.asarray(rgb, np.uint8), (h, w, 3))


@pytest.fixture
def class_tree(tmp_path):
  root = tmp_path / "imgs"
  t = root / "train"
  _save(t / "dog" / "b.png", _solid(30, 50, (200, 30, 30)))            # RGB PNG
  _save(t / "dog" / "a.JPG", _solid(60, 40, (30, 200, 30)), fmt="JPEG")  # RGB JPEG
  _save(t / "cat" / "g.png", _solid(20, 20, (90, 90, 90)), mode="L")     # greyscale
  _save(t / "cat" / "sub" / "r.png", _solid(25, 35, (10, 20, 250)), mode="RGBA")
  _save(t / "cat" / "k.jpeg", _solid(33, 21, (240, 200, 0)), mode="CMYK", fmt="JPEG")
  _save(t / "emu" / "p.bmp", _solid(17, 19, (0, 0, 0)), mode="P")
  (t / "emu" / "notes.txt").write_text("not an image")
  _save(t / "emu" / ".hidden.png", _solid(8, 8, (1, 2, 3)))
  # Wide image: centre square red, the sides blue (checks short-side resize + centre crop).
  wide = np.zeros((20, 60, 3), np.uint8)
  wide[:, :, 2] = 255
  wide[:, 20:40] = (255, 0, 0)
  _save(t / "emu" / "wide.png", wide)
  _save(root / "val" / "emu" / "v.png", _solid(22, 22, (5, 250, 5)))
  return root


def test_folder_classes_layout_decodes_everything_to_rgb(class_tree):
  train = make_source(_cfg(source="folder", root=str(class_tree)), "train")
  assert train.class_names == ["cat", "dog", "emu"] and train.num_classes == 3
  rel = [os.path.relpath(f, class_tree / "train") for f in train.files]
  assert rel == ["cat/g.png", "cat/k.jpeg", "cat/sub/r.png", "dog/a.JPG",
                 "dog/b.png", "emu/p.bmp", "emu/wide.png"]
  expected_rgb = [(90, 90, 90), (240, 200, 0), (10, 20, 250), (30, 200, 30),
                  (200, 30, 30), (0, 0, 0), None]
  for i, rgb in enumerate(expected_rgb):
    img, label = train.get(i)
    assert img.shape == (S, S, 3) and img.dtype == np.uint8
    assert label == [0, 0, 0, 1, 1, 2, 2][i]
    if rgb is not None:  # solid colours survive (JPEG/CMYK within tolerance)
      np.testing.assert_allclose(img.reshape(-1, 3).mean(0), rgb, atol=12)
  grey = train.get(0)[0]
  assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
  wide = train.get(6)[0].astype(int)
  assert (wide[:, 2:-2, 0] > 200).all() and (wide[:, 2:-2, 2] < 60).all()
  # The val split uses the train split's label space: 'emu' is label 2, not 0.
  val = make_source(_cfg(source="folder", root=str(class_tree)), "val")
  assert len(val) == 1 and val.class_names == ["cat", "dog", "emu"]
  img, label = val.get(0)
  assert label == 2 and img.shape == (S, S, 3)


def test_folder_flat_layout_splits_the_sorted_list(tmp_path):
  root = tmp_path / "faces"
  names = ["a/1.png", "a/2.png", "b/0.jpg", "c.png", "d.webp", "e/f/g.PNG", "z.png"]
  for k, name in enumerate(names):
    _save(root / name, _solid(12 + k, 10, (10 * k, 0, 0)))
  cfg = _cfg(source="folder", layout="flat", root=str(root), flat_val_count=2)
  train, val = make_source(cfg, "train"), make_source(cfg, "val")
  assert train.num_classes == val.num_classes == 0 and train.class_names == []
  assert [os.path.relpath(f, root) for f in train.files] == names[:5]
  assert [os.path.relpath(f, root) for f in val.files] == names[5:]
  img, label = val.get(1)
  assert img.shape == (S, S, 3) and label == 0
  assert abs(int(img[..., 0].mean()) - 60) <= 2
  with pytest.raises(DataError, match="flat_val_count"):
    make_source(_cfg(source="folder", layout="flat", root=str(root),
                     flat_val_count=7), "train")


def test_folder_missing_and_empty_folders_raise_clear_errors(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    make_source(_cfg(source="folder", root=str(tmp_path / "nope")), "train")
  (tmp_path / "empty" / "train").mkdir(parents=True)
  with pytest.raises(DataError, match="No class folders"):
    make_source(_cfg(source="folder", root=str(tmp_path / "empty")), "train")
  with pytest.raises(DataError, match=r"val does not exist"):
    make_source(_cfg(source="folder", root=str(tmp_path / "empty")), "val")
  (tmp_path / "noimg" / "train" / "cls").mkdir(parents=True)
  (tmp_path / "noimg" / "train" / "cls" / "readme.txt").write_text("x")
  with pytest.raises(DataError, match="No images"):
    make_source(_cfg(source="folder", root=str(tmp_path / "noimg")), "train")
  (tmp_path / "flat_empty").mkdir()
  with pytest.raises(DataError, match="No images"):
    make_source(_cfg(source="folder", layout="flat",
                     root=str(tmp_path / "flat_empty")), "train")


def test_folder_corrupt_images_error_or_skip(tmp_path):
  root = tmp_path / "d"
  _save(root / "train" / "c" / "0.png", _solid(10, 10, (255, 0, 0)))
  (root / "train" / "c" / "1.jpg").write_bytes(b"definitely not a jpeg")
  _save(root / "train" / "c" / "2.png", _solid(10, 10, (0, 255, 0)))
  good = (root / "train" / "c" / "2.png").read_bytes()
  (root / "train" / "c" / "3.png").write_bytes(good[: len(good) // 2])  # truncated
  strict = FolderSource(str(root), "train", S)
  assert len(strict) == 4
  with pytest.raises(DataError, match=r"1\.jpg.*on_bad_image=skip"):
    strict.get(1)
  skip = FolderSource(str(root), "train", S, on_bad_image="skip")
  img, label = skip.get(1)  # the next readable item instead
  np.testing.assert_array_equal(img, skip.get(2)[0])
  assert img[..., 1].min() > 240 and label == 0
  np.testing.assert_array_equal(skip.get(3)[0], skip.get(0)[0])  # wraps around
  skip.get(1)
  assert skip.num_skipped == 2  # distinct bad files


# ----------------------------------------------------------------- tfds source


def _tfds_dataset(data_dir):
  """Prepares a tiny labelled array_record tfds dataset without TensorFlow."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class Vqvae2TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=["red", "green", "blue"])}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(6, bad=4),
              "validation": self._generate_examples(3, bad=-1)}

    def _generate_examples(self, n, bad):
      for i in range(n):
        rgb = [0, 0, 0]
        rgb[i % 3] = 255
        # Encoded bytes / PIL images need no TensorFlow to be written.
        image = b"broken" if i == bad else Image.fromarray(_solid(20 + i, 30, rgb))
        yield i, {"image": image, "label": i % 3}

  builder = Vqvae2TinyImages(data_dir=str(data_dir), file_format="array_record")
  try:
    builder.download_and_prepare()
  except ImportError as e:
    pytest.skip(f"this tfds version needs TensorFlow to prepare a dataset: {e}")
  return builder.name


def test_tfds_source_reads_prepared_array_record_without_tensorflow(tmp_path):
  name = _tfds_dataset(tmp_path)
  cfg = _cfg(source="tfds", tfds_name=name, tfds_data_dir=str(tmp_path))
  val = make_source(cfg, "val")  # 'val' -> the dataset's 'validation' split
  assert len(val) == 3 and val.class_names == ["red", "green", "blue"]
  for i in range(3):
    img, label = val.get(i)
    assert img.shape == (S, S, 3) and img.dtype == np.uint8
    assert img[..., label].min() > 240  # each colour matches its label
  strict = make_source(cfg, "train")
  assert len(strict) == 6
  errors = 0
  for i in range(6):
    try:
      strict.get(i)
    except DataError as e:
      errors += 1
      assert "on_bad_image=skip" in str(e)
  assert errors == 1
  skip = make_source(_cfg(source="tfds", tfds_name=name, tfds_data_dir=str(tmp_path),
                          on_bad_image="skip"), "train")
  labels = [skip.get(i)[1] for i in range(6)]
  assert skip.num_skipped == 1 and all(0 <= l < 3 for l in labels)
  with pytest.raises(DataError, match="no split 'test'"):
    make_source(_cfg(source="tfds", tfds_name=name, tfds_data_dir=str(tmp_path),
                     val_split="test"), "val")


def test_tfds_missing_dataset_explains_how_to_prepare(tmp_path):
  cfg = _cfg(source="tfds", tfds_name="imagenet2012", tfds_data_dir=str(tmp_path))
  with pytest.raises(DataError) as err:
    make_source(cfg, "train")
  msg = str(err.value)
  assert "not prepared" in msg and "ILSVRC2012_img_train.tar" in msg
  assert f"{tmp_path}/downloads/manual" in msg
  assert "tfds build imagenet2012" in msg and "--file_format=array_record" in msg
  assert not any(tmp_path.iterdir())  # nothing downloaded or created
  with pytest.raises(DataError, match="unknown"):
    make_source(_cfg(source="tfds", tfds_name="no_such_dataset_xyz",
                     tfds_data_dir=str(tmp_path)), "train")


def test_make_source_rejects_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="split"):
    make_source(_cfg(), "test")
  for k in range(2):
    _save(tmp_path / f"{k}.png", _solid(4, 4, (k, k, k)))
  with pytest.raises(ValueError, match="data.source"):
    make_source(_cfg(source="nope"), "train")
  with pytest.raises(ValueError, match="on_bad_image"):
    make_source(_cfg(on_bad_image="maybe", source="folder", root=str(tmp_path),
                     layout="flat", flat_val_count=1), "train")


# ---------------------------------------------------------------------- loader


class _IndexSource:
  """Items whose pixels spell out (index, epoch): channel 0/1 = index, 2 = epoch."""

  num_classes, class_names, num_skipped = 0, [], 0

  def __init__(self, n, fail_at=None):
    self.n, self.fail_at = n, fail_at

  def __len__(self):
    return self.n

  def get(self, index, epoch=0):
    if index == self.fail_at:
      raise DataError(f"bad item {index}")
    img = np.empty((2, 2, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = index % 256, index // 256, epoch
    return img, index


def _take(loader, k):
  return [next(loader) for _ in range(k)]


def _grain_order(n, seed, epoch):
  """The documented item order of an epoch: grain's shuffle at positions e*n + k."""
  order = grain.MapDataset.range(n).shuffle(seed=seed)
  return np.asarray([order[epoch * n + k] for k in range(n)])


def test_loader_batches_follow_the_seeded_shuffle():
  n, g = 50, 8  # 6 steps per epoch, 2 items dropped per epoch
  loader = BatchLoader(_IndexSource(n), g, seed=7, process_index=0, process_count=1)
  assert loader.steps_per_epoch == 6
  batches = _take(loader, 14)
  epochs = {}
  for k, batch in enumerate(batches):
    epoch, step = divmod(k, 6)
    assert batch["image"].shape == (g, 2, 2, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32
    perm = _grain_order(n, 7, epoch)
    np.testing.assert_array_equal(batch["label"], perm[step * g:(step + 1) * g])
    np.testing.assert_array_equal(batch["label"], loader.indices(epoch, step))
    assert (batch["image"][..., 2] == epoch).all()  # items read with their epoch
    epochs.setdefault(epoch, []).extend(batch["label"].tolist())
  for epoch in (0, 1):  # a whole epoch: 48 distinct items, none twice
    assert len(epochs[epoch]) == len(set(epochs[epoch])) == 48
    assert set(epochs[epoch]) <= set(range(n))
  assert epochs[0] != epochs[1] and epochs[0] != sorted(epochs[0])  # reshuffled
  again = _take(BatchLoader(_IndexSource(n), g, seed=7, process_index=0, process_count=1), 14)
  for x, y in zip(batches, again):
    np.testing.assert_array_equal(x["image"], y["image"])
  other = _take(BatchLoader(_IndexSource(n), g, seed=8, process_index=0, process_count=1), 6)
  assert not all(np.array_equal(x["label"], y["label"]) for x, y in zip(batches, other))
  ordered = BatchLoader(_IndexSource(n), g, seed=7, shuffle=False, process_index=0,
                        process_count=1)
  np.testing.assert_array_equal(next(ordered)["label"], np.arange(8))
  with pytest.raises(ValueError, match="seed"):
    BatchLoader(_IndexSource(n), g, seed=2**32, process_index=0, process_count=1)


@pytest.mark.parametrize("processes", [2, 4])
def test_loader_process_slices_tile_the_global_batch(processes):
  n, g = 37, 8
  whole = _take(BatchLoader(_IndexSource(n), g, seed=3, process_index=0, process_count=1), 10)
  parts = [_take(BatchLoader(_IndexSource(n), g, seed=3, process_index=p,
                             process_count=processes), 10) for p in range(processes)]
  for k in range(10):
    labels = np.concatenate([parts[p][k]["label"] for p in range(processes)])
    images = np.concatenate([parts[p][k]["image"] for p in range(processes)])
    assert all(parts[p][k]["label"].shape == (g // processes,) for p in range(processes))
    np.testing.assert_array_equal(labels, whole[k]["label"])
    np.testing.assert_array_equal(images, whole[k]["image"])
    assert len(set(labels.tolist())) == g


def test_loader_resume_gives_the_uninterrupted_batches():
  def make():
    return BatchLoader(_IndexSource(45), 6, seed=11, process_index=1, process_count=2,
                       num_threads=3)
  reference = _take(make(), 20)
  first = make()
  _take(first, 9)  # crosses the epoch boundary (7 steps per epoch)
  state = json.loads(json.dumps(first.get_state()))
  assert state == {"epoch": 1, "step": 2}
  resumed = make()
  resumed.set_state(state)
  for k, (a, b) in enumerate(zip(_take(first, 11), _take(resumed, 11))):
    np.testing.assert_array_equal(a["label"], reference[9 + k]["label"])
    np.testing.assert_array_equal(b["image"], reference[9 + k]["image"])
  first.set_state({"epoch": 0, "step": 3})  # rewinding drops the prefetched batch
  np.testing.assert_array_equal(next(first)["label"], reference[3]["label"])
  with pytest.raises(ValueError, match="out of range"):
    first.set_state({"epoch": 0, "step": 7})
  first.close()


def test_loader_errors_and_failed_batches():
  with pytest.raises(ValueError, match="not divisible"):
    BatchLoader(_IndexSource(40), 6, seed=0, process_index=0, process_count=4)
  with pytest.raises(DataError, match="fewer than one global batch"):
    BatchLoader(_IndexSource(5), 8, seed=0, process_index=0, process_count=1)
  loader = BatchLoader(_IndexSource(16, fail_at=3), 16, seed=0, shuffle=False,
                       process_index=0, process_count=1)
  with pytest.raises(DataError, match="bad item 3"):
    next(loader)
  assert loader.get_state() == {"epoch": 0, "step": 0}  # position not advanced


def test_loader_defaults_to_the_jax_process_layout():
  loader = BatchLoader(_IndexSource(8), 4, seed=0)
  assert (loader.process_index, loader.process_count, loader.batch_size) == (0, 1, 4)


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_iterate_once_covers_every_index_once_with_padding(processes):
  n, g = 23, 8  # 3 global batches, the last one holds 7 real items
  b = g // processes
  per_process = [list(iterate_once(_IndexSource(n), g, process_index=p,
                                   process_count=processes, num_threads=2))
                 for p in range(processes)]
  assert all(len(batches) == 3 for batches in per_process)
  order = []
  for t in range(3):
    for p in range(processes):
      batch = per_process[p][t]
      assert batch["image"].shape == (b, 2, 2, 3) and batch["image"].dtype == np.uint8
      assert batch["index"].dtype == np.int64 and batch["valid"].dtype == bool
      valid = batch["valid"]
      np.testing.assert_array_equal(batch["label"][valid], batch["index"][valid])
      assert (batch["index"][~valid] == -1).all() and (batch["image"][~valid] == 0).all()
      assert (batch["label"][~valid] == 0).all()
      order.extend(batch["index"][valid].tolist())
  assert order == list(range(n))


def test_loader_on_demo_source_end_to_end():
  src = make_source(_cfg(), "train")
  loader = BatchLoader(src, 16, seed=0, process_index=0, process_count=1)
  batch = next(loader)
  assert batch["image"].shape == (16, S, S, 3)
  first = int(_grain_order(64, 0, 0)[0])
  np.testing.assert_array_equal(batch["image"][0], src.get(first, epoch=0)[0])
  assert ((batch["label"] >= 0) & (batch["label"] < src.num_classes)).all()
