"""Input pipeline throughput: images/s the loader delivers vs images/s stage 1 consumes.

Delivered: per-process batches of real JPEGs (../shared/data/imagenette, ImageNet photos)
decoded to 64x64 and 256x256 by
  * `threadpool (old)`: the hand-written thread-pool loader this project used before grain
    (`ThreadPoolLoader` below, kept here verbatim as the baseline), and
  * grain (`vqvae2_jax.data.loader.BatchLoader`) with worker_count 0, 1, 2,
from the image folder and, when tfds can write one here, from an array_record copy of
`--tfds-images` of the same photos (made by this script in a temporary folder; skipped
with the reason otherwise). Variants run back to back in one process: compare ratios.

Consumed: XLA's cost-analysis FLOPs of the configured stage-1 train step (compiled on
this machine, not run) at each size; at `--peak-tflops` x `--utilisation` a device would
train peak * utilisation / FLOPs-per-image images/s, the rate the input must deliver.

  python benchmarks/bench_input.py --peak-tflops 989 --utilisation 0.4
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_vqvae  # noqa: E402  pylint: disable=g-import-not-at-top

from vqvae2_jax.data.folders import FolderSource  # noqa: E402
from vqvae2_jax.data.loader import BatchLoader  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENETTE = os.path.join(os.path.dirname(ROOT), "shared", "data", "imagenette")


class ThreadPoolLoader:
  """Baseline: the pre-grain loader (numpy per-epoch permutation, one thread pool).

  Global batch t of epoch e is perm_e[t*g:(t+1)*g] with perm_e =
  default_rng([seed, e]).permutation(n); process p takes its contiguous part; the
  next batch is submitted before the current one is returned.
  """

  def __init__(self, source, global_batch_size: int, *, seed: int, num_threads: int = 4,
               process_index: int = 0, process_count: int = 1):
    self.source, self.g = source, global_batch_size
    self.p, self.b = process_index, global_batch_size // process_count
    self.seed, self.n = seed, len(source)
    self.steps_per_epoch = self.n // self.g
    self._epoch = self._step = 0
    self._perm_epoch, self._perm = -1, np.arange(0)
    self._pending = None
    self._pool = cf.ThreadPoolExecutor(num_threads)

  def _indices(self, epoch: int, step: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
      self._perm_epoch = epoch
    start = step * self.g + self.p * self.b
    return self._perm[start:start + self.b]

  def _submit(self, epoch: int, step: int):
    return epoch, step, [self._pool.submit(self.source.get, int(i), epoch)
                         for i in self._indices(epoch, step)]

  def _following(self, epoch: int, step: int) -> tuple[int, int]:
    step += 1
    return (epoch + 1, 0) if step == self.steps_per_epoch else (epoch, step)

  def __next__(self) -> dict[str, np.ndarray]:
    here = (self._epoch, self._step)
    if self._pending is None or self._pending[:2] != here:
      self._pending = self._submit(*here)
    current = self._pending
    after = self._following(*here)
    self._pending = self._submit(*after)
    items = [f.result() for f in current[2]]
    self._epoch, self._step = after
    return {"image": np.stack([np.asarray(im, np.uint8) for im, _ in items]),
            "label": np.asarray([lab for _, lab in items], np.int32)}

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)


def images_per_second(loader, batches: int, buffered: int) -> float:
  """Steady-state delivery rate over `batches` batches.

  The first `buffered` batches are not timed: they cover worker start-up and whatever
  the loader had decoded ahead (read-ahead buffers), so the timed batches are decoded
  while the clock runs.
  """
  for _ in range(buffered):
    next(loader)
  start = time.perf_counter()
  count = sum(len(next(loader)["label"]) for _ in range(batches))
  rate = count / (time.perf_counter() - start)
  loader.close()
  return rate


def warm_page_cache(paths) -> None:
  """Reads every file once, so no variant pays the first (cold) disk reads."""
  for path in paths:
    with open(path, "rb") as f:
      f.read()


def tfds_copy(folder: FolderSource, num_images: int, data_dir: str):
  """An array_record tfds dataset of the first `num_images` JPEGs (spread over classes),
  written with tfds in `data_dir`; returns (name, None) or (None, why it was skipped)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return None, f"tensorflow_datasets absent ({e})"
  rows = np.unique(np.linspace(0, len(folder) - 1, num_images).round().astype(int))
  names = folder.class_names

  class ImagenetteCopy(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(names=names)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in rows:
        with open(folder.files[i], "rb") as f:  # the original JPEG bytes, not re-encoded
          yield int(i), {"image": f.read(), "label": int(folder._labels[i])}  # pylint: disable=protected-access

  builder = ImagenetteCopy(data_dir=data_dir, file_format="array_record")
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    # Some tfds versions need TensorFlow to write (or re-check) JPEG features.
    return None, f"tfds could not write the copy here ({type(e).__name__}: {str(e)[:120]})"
  return builder.name, None


def consumption(experiment: str, sizes, peak_tflops: float, utilisation: float):
  """{size: (GFLOP per image, images/s at the given peak and utilisation)}."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  config = bench_vqvae.load_config(experiment, "")
  out = {}
  for size in sizes:
    bench = bench_vqvae.JaxVQVAEBench(config, experiment, 2, size, jnp.bfloat16,
                                      ops=("train",))
    flops = bench.flops["train"]
    out[size] = (None, None) if not flops else (
        flops / 1e9, peak_tflops * 1e12 * utilisation / flops)
  return out


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default=IMAGENETTE, help="image folder (classes layout)")
  parser.add_argument("--sizes", default="64,256")
  parser.add_argument("--workers", default="0,1,2", help="grain worker_count values")
  parser.add_argument("--threads", type=int, default=4, help="read threads per process")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=24, help="timed batches per variant")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
  parser.add_argument("--tfds-images", type=int, default=3000)
  parser.add_argument("--experiment", default="imagenet256", help="configs/<name>.py")
  parser.add_argument("--peak-tflops", type=float, default=989.0,
                      help="device peak (989: H200 dense bf16)")
  parser.add_argument("--utilisation", type=float, default=0.4)
  parser.add_argument("--no-flops", action="store_true", help="skip the train-step compile")
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if not os.path.isdir(args.root):
    print(f"no images at {args.root}: nothing to measure (pass --root)")
    return {}
  sizes = [int(s) for s in args.sizes.split(",")]
  workers = [int(w) for w in args.workers.split(",")]
  print(f"load average before: {os.getloadavg()}  cpus: {os.cpu_count()}  batch "
        f"{args.batch} x {args.batches} timed batches, {args.threads} threads/process",
        flush=True)
  runs: dict[tuple[str, int, str], list[float]] = {}
  with tempfile.TemporaryDirectory() as tmp:
    folder0 = FolderSource(args.root, "train", sizes[0])
    warm_page_cache(folder0.files)
    tfds_name, why = tfds_copy(folder0, args.tfds_images, tmp)
    kinds = ["folder"] + (["tfds"] if tfds_name else [])
    if why:
      print(f"tfds array_record copy skipped: {why}")
    for round_index in range(args.rounds):  # variants interleaved; medians reported
      for kind in kinds:
        for size in sizes:
          if kind == "folder":
            src = FolderSource(args.root, "train", size)
          else:
            from vqvae2_jax.data.tfds_source import TfdsSource  # pylint: disable=g-import-not-at-top
            src = TfdsSource(tfds_name, "train", size, data_dir=tmp)
          variants = {"threadpool (old)": (0, lambda s=src: ThreadPoolLoader(
              s, args.batch, seed=round_index, num_threads=args.threads))}
          for w in workers:
            variants[f"grain workers={w}"] = (w, lambda s=src, w=w: BatchLoader(
                s, args.batch, seed=round_index, process_index=0, process_count=1,
                num_threads=args.threads, worker_count=w))
          for name, (w, make) in variants.items():
            # grain reads `threads` batches ahead per process, and each worker adds its
            # output queue and the interleave buffer: skip twice that many.
            buffered = 2 + 2 * (args.threads + 2) * max(w, 1)
            rate = images_per_second(make(), args.batches, buffered)
            runs.setdefault((kind, size, name), []).append(rate)
            print(f"  round {round_index}  {kind:6s} {size:4d}px  {name:18s} {rate:8.1f} "
                  f"img/s   load {os.getloadavg()[0]:.2f}", flush=True)
  rates = {k: float(np.median(v)) for k, v in runs.items()}
  need = {} if args.no_flops else consumption(args.experiment, sizes, args.peak_tflops,
                                               args.utilisation)
  print(f"\nload average after: {os.getloadavg()}")
  names = ["threadpool (old)"] + [f"grain workers={w}" for w in workers]
  head = f"| source | size | " + " | ".join(names) + " | stage-1 consumes |"
  print(head + "\n|" + "---|" * (len(names) + 3))
  for kind in kinds:
    for size in sizes:
      old = rates[(kind, size, names[0])]
      cells = [f"{old:.0f}"] + [f"{rates[(kind, size, n)]:.0f} ({rates[(kind, size, n)] / old:.2f}x)"
                                for n in names[1:]]
      gflop, per_s = need.get(size, (None, None))
      want = "-" if per_s is None else f"{per_s:,.0f} img/s ({gflop:.1f} GFLOP/img)"
      print(f"| {kind} | {size} | " + " | ".join(cells) + f" | {want} |")
  if need:
    print(f"\nconsumption: {args.experiment} stage-1 train step (XLA cost analysis, bf16), "
          f"{args.peak_tflops:g} TFLOP/s peak at {args.utilisation:.0%} utilisation")
  return {"rates": {"/".join(map(str, k)): v for k, v in rates.items()}, "need": need}


if __name__ == "__main__":
  main()
