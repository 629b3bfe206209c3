"""Workdirs and data on a bucket (gs://), against a GCS API server on 127.0.0.1.

The server (tests/bucket_server.py) is started by a module fixture; the CLI runs in
subprocesses whose environment points gcsfs and tensorstore at it. One tiny pipeline run
on `gs://vqbucket/run` is shared by the end-to-end, API and codec tests.
"""
import io
import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorstore as ts

import bucket_server
from fault_injection import failing_array_reads, io_error
from helpers import ROOT, load_config
from test_data import _tfds_dataset

import vqvae2_jax
from vqvae2_jax import checkpoint as ckpt_lib
from vqvae2_jax import checkpoint_reads
from vqvae2_jax import storage
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.data import folders
from vqvae2_jax.data.sources import make_source
from vqvae2_jax.data.tfds_source import TfdsSource
from vqvae2_jax.workdir import Workdir

pytestmark = pytest.mark.xdist_group("bucket")

BUCKET = f"gs://{bucket_server.BUCKET}"
RUN = f"{BUCKET}/run"
DRIVER = os.path.join(ROOT, "tests", "fault_injection.py")


@pytest.fixture(scope="module")
def gcs():
  """The server's client environment; this process's clients point at it meanwhile."""
  saved = {k: os.environ.get(k) for k in bucket_server.client_env("")}
  with bucket_server.serve() as env:
    bucket_server.use_in_process(env)
    try:
      yield env
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v


def _run(env, *args, fault=None, timeout=900):
  full_env = dict(os.environ, **env)
  full_env.pop("FAULT", None)
  if fault:
    full_env["FAULT"] = fault
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pipeline(gcs):
  """`main --config=configs/demo.py:pipeline,tiny --workdir=gs://vqbucket/run`."""
  result = _run(gcs, "-m", "vqvae2_jax.main", "--config=configs/demo.py:pipeline,tiny",
                f"--workdir={RUN}")
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def _records(data: bytes) -> list[bytes]:
  """The records of a TFRecord (TensorBoard event) file, framing checked."""
  out, offset = [], 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    out.append(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4
  assert offset == len(data)
  return out


def _png(path: str) -> np.ndarray:
  with storage.open(path, "rb") as f:
    return np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))


def test_pipeline_writes_every_file_to_the_bucket(pipeline):
  w = Workdir(RUN)
  for stage in ("vqvae", "extract", "prior_top", "prior_bottom", "classifier", "sample",
                "evaluate"):
    assert storage.exists(w.path_in(stage, "config.json")), stage
  for stage in ("vqvae", "prior_top", "prior_bottom", "classifier"):
    assert w.checkpoint_steps(stage)[-1] == 4, stage
    rows = [json.loads(l) for l in storage.read_text(w.path_in(stage, "metrics.jsonl"))
            .splitlines()]
    assert rows and rows[-1]["step"] == 4, stage
    events = storage.glob(storage.join(w.path_in(stage, "tensorboard"), "events.out.*"))
    assert len(events) == 1, stage
    with storage.open(events[0], "rb") as f:
      records = _records(f.read())
    assert len(records) > 2 and b"train/loss" in b"".join(records), stage
  manifest = w.manifest()
  for split in ("train", "val"):
    shards = codes_lib.CodeShards(w.extract_dir, split)
    assert len(shards) == manifest["splits"][split]["num_images"] > 0
  with storage.open(w.path_in("sample", "samples.npz"), "rb") as f, np.load(f) as npz:
    size = manifest["image_size"]
    assert npz["image"].shape == (16, size, size, 3) and npz["image"].dtype == np.uint8
  for picture in ("vqvae/reconstructions.png", "vqvae/curves.png", "sample/samples.png",
                  "sample/rejection.png", "evaluate/tradeoff.png",
                  "evaluate/rate_distortion.png", "sample/images/00015.png"):
    assert _png(storage.join(RUN, picture)).size > 0, picture
  report = json.loads(storage.read_text(w.path_in("evaluate", "report.json")))
  assert report["workdir"] == RUN and report["vqvae_step"] == 4
  assert "tradeoff.png" in storage.read_text(w.path_in("evaluate", "report.md"))
  # Nothing went to a local folder named after the URL.
  assert not os.path.exists(os.path.join(ROOT, "gs:"))


def test_load_from_the_bucket_encodes_as_extract_did(pipeline):
  run = vqvae2_jax.load(RUN)
  source = make_source(run.config.data, "val")
  shards = codes_lib.CodeShards(run.workdir.extract_dir, "val")
  n = min(len(source), 8)
  images = np.stack([source.get(i)[0] for i in range(n)])
  top, bottom = run.encode(images)
  extracted = shards.take(np.arange(n))
  assert top.shape == extracted["top"].shape and bottom.shape == extracted["bottom"].shape
  # The stage-1 model read back from the bucket codes as the extract stage did.
  assert np.mean(top == extracted["top"]) > 0.99
  assert np.mean(bottom == extracted["bottom"]) > 0.99
  pixels = run.decode((top, bottom))
  assert pixels.shape == images.shape and pixels.dtype == np.uint8
  np.testing.assert_array_equal(pixels, run.reconstruct(images))


def test_codec_streams_in_the_bucket(pipeline, gcs):
  run = vqvae2_jax.load(RUN)
  image = make_source(run.config.data, "val").get(0)[0]
  storage.save_picture(Image.fromarray(image), f"{BUCKET}/inputs/a.png")
  compress = _run(gcs, "-m", "vqvae2_jax.codec", "compress", f"--workdir={RUN}",
                  f"{BUCKET}/inputs/a.png", f"--out={BUCKET}/streams")
  assert compress.returncode == 0, compress.stderr[-3000:]
  decompress = _run(gcs, "-m", "vqvae2_jax.codec", "decompress", f"--workdir={RUN}",
                    f"{BUCKET}/streams/a.vq2c", f"--out={BUCKET}/decoded")
  assert decompress.returncode == 0, decompress.stderr[-3000:]
  np.testing.assert_array_equal(_png(f"{BUCKET}/decoded/a.png"),
                                run.reconstruct(image[None])[0])


def test_kill9_inside_a_save_resumes_from_the_bucket(pipeline, gcs):
  workdir = f"{BUCKET}/killed"
  args = (DRIVER, "--config=configs/demo.py:vqvae,tiny",
          "--config.vqvae_train.checkpoint_every=1", f"--workdir={workdir}")
  killed = _run(gcs, *args, fault="sigkill_save:3")
  assert killed.returncode == -9, killed.stderr[-3000:]
  # Step 3 was written in place (a bucket has no rename) but never marked finished.
  assert storage.exists(f"{Workdir(workdir).checkpoint_dir('vqvae')}/3/state")
  assert Workdir(workdir).checkpoint_steps("vqvae") == [1, 2]
  rerun = _run(gcs, *args)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resumed from step 2" in rerun.stdout
  # Bit-exact: the final state of the pipeline's uninterrupted stage 1.
  assert _record(workdir, 4)["checksums"] == _record(RUN, 4)["checksums"]


def _record(workdir: str, step: int) -> dict:
  c = ckpt_lib.Checkpointer(Workdir(workdir).checkpoint_dir("vqvae"), keep=None)
  try:
    return c.read_record(step)
  finally:
    c.close()


def _solid(rgb, size=(24, 20)):
  return np.broadcast_to(np.asarray(rgb, np.uint8), size + (3,)).copy()


def test_folder_data_root_on_the_bucket_reads_as_locally(gcs, tmp_path):
  root = f"{BUCKET}/images"
  for split, n in (("train", 3), ("val", 2)):
    for name, rgb in (("blue", (0, 0, 255)), ("red", (255, 0, 0))):
      for i in range(n):
        for base in (str(tmp_path), root):
          path = storage.join(base, split, name, "sub" if i else "", f"{i}.png")
          storage.makedirs(storage.dirname(path))
          storage.save_picture(Image.fromarray(_solid(rgb)), path)
  storage.write_text(f"{root}/train/.hidden/x.png", "not an image")
  for split in ("train", "val"):
    config = load_config("demo", "vqvae,tiny").data
    with config.unlocked():
      config.update(dict(source="folder", image_size=16, layout="classes"))
    config.root = root
    remote = make_source(config, split)
    config.root = str(tmp_path)
    local = make_source(config, split)
    assert remote.class_names == local.class_names == ["blue", "red"]
    assert len(remote) == len(local) == (6 if split == "train" else 4)
    for i in range(len(local)):
      image, label = remote.get(i)
      np.testing.assert_array_equal(image, local.get(i)[0])
      assert label == local.get(i)[1]
  folders._class_listing.cache_clear()  # pylint: disable=protected-access


def test_tfds_data_dir_on_the_bucket_reads_as_locally(gcs, tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where the local copy goes
  local = tmp_path / "tfds"
  name = _tfds_dataset(local)
  for f in storage.walk_files(str(local)):
    storage.write_bytes(f"{BUCKET}/tfds/{f}", (local / f).read_bytes())
  remote = TfdsSource(name, "validation", 16, data_dir=f"{BUCKET}/tfds")
  here = TfdsSource(name, "validation", 16, data_dir=str(local))
  assert len(remote) == len(here) == 3 and remote.class_names == here.class_names
  for i in range(3):
    image, label = remote.get(i)
    np.testing.assert_array_equal(image, here.get(i)[0])
    assert label == here.get(i)[1]
  copy = tmp_path / "home" / ".cache" / "vqvae2_jax" / "buckets" / "vqbucket" / "tfds" / name
  assert sorted(storage.walk_files(str(copy))) == sorted(
      storage.walk_files(f"{BUCKET}/tfds/{name}"))


def _state(value: float) -> dict:
  return {"params": {"w": jnp.full((4, 3), value), "b": jnp.arange(5.0) + value}}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def _objects(directory: str) -> dict[str, str]:
  return {name: storage.digest(storage.join(directory, name))
          for name in storage.walk_files(directory)}


def _corrupt(checkpoints: str, step: int) -> None:
  """Changes one element of params/w through tensorstore (the files stay well-formed)."""
  base = f"{checkpoints}/{step}/state"
  array = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base,
                                                 "path": "params.w/"}}).result()
  values = array.read().result()
  values.reshape(-1)[0] += 1.0
  array.write(values).result()


def test_rejected_step_is_copied_verified_then_deleted_on_the_bucket(gcs):
  directory = f"{BUCKET}/reject/checkpoints"
  c = ckpt_lib.Checkpointer(directory, keep=None)
  try:
    for step in (1, 2):
      c.save(step, _state(float(step)), {"step": step})
    _corrupt(directory, 2)
    before = _objects(f"{directory}/2")
    state, record, skipped = c.restore_newest_valid(_abstract(_state(0.0)))
    assert record["step"] == 1 and [s for s, _ in skipped] == [2]
    np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 1.0))
    assert c.all_steps() == [1] and not storage.exists(f"{directory}/2")
    moved = _objects(f"{directory}/{ckpt_lib.REJECTED}/2")
    assert moved.pop("why.txt") and moved == before
    assert "differ from the checksums" in storage.read_text(
        f"{directory}/{ckpt_lib.REJECTED}/2/why.txt")
  finally:
    c.close()


def _resume(directory: str):
  c = ckpt_lib.Checkpointer(directory, keep=None)
  try:
    return c.restore_newest_valid(_abstract(_state(0.0)))
  finally:
    c.close()


def test_a_failing_array_read_on_the_bucket_moves_nothing_and_resumes_after(gcs,
                                                                            monkeypatch):
  monkeypatch.setattr(checkpoint_reads, "DEFAULT_RETRY",
                      checkpoint_reads.RetryPolicy(tries=3, first_delay_s=0.01))
  directory = f"{BUCKET}/flaky/checkpoints"
  c = ckpt_lib.Checkpointer(directory, keep=None)
  try:
    for step in (1, 2):
      c.save(step, _state(float(step)), {"step": step})
  finally:
    c.close()
  before = _objects(directory)
  with failing_array_reads(2, io_error) as failed:
    with pytest.raises(ckpt_lib.CheckpointReadError) as raised:
      _resume(directory)
  assert raised.value.kind == "transient" and raised.value.step == 2
  assert failed["failed"] >= 3 and "nothing was moved" in str(raised.value)
  assert _objects(directory) == before  # no step moved to rejected/, no byte changed
  state, record, skipped = _resume(directory)  # the storage answers again
  assert record["step"] == 2 and skipped == []
  np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 2.0))


def test_a_move_whose_copy_differs_keeps_the_original(gcs, monkeypatch):
  src, dst = f"{BUCKET}/move/a", f"{BUCKET}/move/b"
  storage.write_text(f"{src}/x.txt", "x")
  storage.write_text(f"{src}/d/y.txt", "y")
  digest = storage.digest
  monkeypatch.setattr(storage, "digest",
                      lambda p: digest(p) + ("!" if p.startswith(dst) else ""))
  with pytest.raises(storage.MoveError, match="differs"):
    storage.move_tree(src, dst)
  assert sorted(storage.walk_files(src)) == ["d/y.txt", "x.txt"]
  monkeypatch.setattr(storage, "digest", digest)
  storage.move_tree(src, dst)
  assert not storage.exists(src) and storage.read_text(f"{dst}/d/y.txt") == "y"
