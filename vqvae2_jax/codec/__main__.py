r"""Command line of the codec: compress, decompress, likelihood.

  python -m vqvae2_jax.codec compress   --workdir=W a.png b.jpg ... --out=DIR
  python -m vqvae2_jax.codec decompress --workdir=W DIR/a.vq2c ...  --out=DIR2
  python -m vqvae2_jax.codec likelihood --workdir=W a.png b.jpg ... [--json=bits.json]

compress writes DIR/<name>.vq2c per image, decompress DIR2/<name>.png per stream (the
pixels of `run.reconstruct`), likelihood prints the code length of each image's latents
per level, in total and per pixel. Images of another size than the models' S x S have
their short side resized to S and the centre square cut out (as the data pipeline does;
each such image is named). A missing or unreadable image, or a truncated, corrupted or
foreign stream, stops the command with a one-line error, or with --on_bad_input=skip is
reported and left out. Several images go through each device call (--batch_size).

This is an entry point (like vqvae2_jax.main): it loads the workdir through the run API.
"""
from __future__ import annotations

import json
import sys
import time

from absl import app
from absl import flags
import numpy as np

from vqvae2_jax import registry
from vqvae2_jax import storage

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Experiment directory with trained vqvae and priors.")
flags.DEFINE_string("out", None, "Output folder (compress, decompress).")
flags.DEFINE_integer("batch_size", 8, "Images per device call.")
flags.DEFINE_integer("label", -1, "Class label for class-conditional priors (compress, "
                     "likelihood); -1: each image's cheapest class.")
flags.DEFINE_enum("on_bad_input", registry.BAD_IMAGE_ERROR, list(registry.ON_BAD_IMAGE),
                  "A missing/unreadable image or a bad stream: stop, or report and skip.")
flags.DEFINE_string("json", None, "likelihood: also write the figures to this JSON file.")

COMMANDS = ("compress", "decompress", "likelihood")


class _Progress:
  """One line per batch: done/total, items per second."""

  def __init__(self, verb: str, total: int):
    self.verb, self.total, self.start, self.done = verb, total, time.time(), 0

  def __call__(self, done: int, extra: str = "") -> None:
    self.done = done
    rate = done / max(time.time() - self.start, 1e-9)
    print(f"{self.verb} {done}/{self.total} ({rate:.2f} img/s){extra}", flush=True)


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _bad(message: str) -> None:
  """A bad input under --on_bad_input."""
  if FLAGS.on_bad_input == registry.BAD_IMAGE_ERROR:
    _fail(message + " (--on_bad_input=skip leaves such inputs out)")
  print(f"skipped: {message}", file=sys.stderr)


def _chunks(items, size):
  for lo in range(0, len(items), size):
    yield items[lo:lo + size]


def _read_images(paths, size):
  from vqvae2_jax.codec import files  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.data.errors import DataError  # pylint: disable=g-import-not-at-top
  good, images = [], []
  for p in paths:
    try:
      image, note = files.read_image(p, size)
    except DataError as e:
      _bad(str(e))
      continue
    if note:
      print(note, flush=True)
    good.append(p)
    images.append(image)
  return good, (np.stack(images) if images else None)


def _labels(n: int):
  return None if FLAGS.label < 0 else np.full(n, FLAGS.label, np.int32)


def compress(run, paths) -> None:
  from vqvae2_jax.codec import files  # pylint: disable=g-import-not-at-top
  storage.makedirs(FLAGS.out)
  size = run.config.data.image_size
  progress, taken, total_bytes, done = _Progress("compressed", len(paths)), set(), 0, 0
  for chunk in _chunks(paths, FLAGS.batch_size):
    good, images = _read_images(chunk, size)
    if good:
      streams = run.compress(images, _labels(len(good)), batch_size=FLAGS.batch_size)
      for path, data in zip(good, streams):
        storage.write_bytes(files.output_path(FLAGS.out, path, files.STREAM_SUFFIX, taken),
                            data)
        total_bytes += len(data)
    done += len(chunk)
    progress(done, f", {total_bytes} bytes so far")
  count = len(taken)
  if count:
    print(f"{count} streams in {FLAGS.out}: {total_bytes} bytes, "
          f"{8 * total_bytes / (count * size * size):.4f} bits per pixel")


def decompress(run, paths) -> None:
  from vqvae2_jax.codec import coder, files  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.codec.stream import StreamError  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.data.errors import DataError  # pylint: disable=g-import-not-at-top
  storage.makedirs(FLAGS.out)
  good, streams = [], []
  for p in paths:  # every stream checked before any decoding
    try:
      data = files.read_stream(p)
      coder.parse_streams(run.codec, [data], [p])
    except (DataError, StreamError) as e:
      _bad(str(e))
      continue
    good.append(p)
    streams.append(data)
  progress, taken, done = _Progress("decompressed", len(paths)), set(), len(paths) - len(good)
  for lo in range(0, len(good), FLAGS.batch_size):
    names = good[lo:lo + FLAGS.batch_size]
    try:
      images = run.decompress(streams[lo:lo + FLAGS.batch_size], names=names)
    except StreamError as e:
      _bad(str(e))
      continue
    for path, image in zip(names, images):
      files.write_png(files.output_path(FLAGS.out, path, ".png", taken), image)
    done += len(names)
    progress(done)
  print(f"{len(taken)} images in {FLAGS.out}")


def likelihood(run, paths) -> None:
  size = run.config.data.image_size
  rows, levels = [], run.level_names
  print("image\t" + "\t".join(f"bits_{l}" for l in levels) + "\tbits\tbits_per_pixel")
  for chunk in _chunks(paths, FLAGS.batch_size):
    good, images = _read_images(chunk, size)
    if not good:
      continue
    result = run.log_prob(images, _labels(len(good)))
    for i, path in enumerate(good):
      row = {"image": path, "bits": float(result["bits"][i]),
             "bits_per_pixel": float(result["bits_per_pixel"][i]),
             "levels": {l: float(result["levels"][l][i]) for l in levels}}
      if result["label"] is not None:
        row["label"] = int(result["label"][i])
      rows.append(row)
      print(f"{path}\t" + "\t".join(f"{row['levels'][l]:.1f}" for l in levels) +
            f"\t{row['bits']:.1f}\t{row['bits_per_pixel']:.4f}", flush=True)
  if rows:
    print(f"mean over {len(rows)} images: {np.mean([r['bits'] for r in rows]):.1f} bits, "
          f"{np.mean([r['bits_per_pixel'] for r in rows]):.4f} bits per pixel (code length "
          "of the latents, not a pixel likelihood)")
  if FLAGS.json:
    storage.write_text(FLAGS.json, json.dumps({"images": rows, "image_size": size}, indent=1))


def main(argv) -> None:
  if len(argv) < 2 or argv[1] not in COMMANDS:
    _fail(f"usage: python -m vqvae2_jax.codec {{{'|'.join(COMMANDS)}}} --workdir=W "
          "FILE... [--out=DIR]")
  command, paths = argv[1], argv[2:]
  if not FLAGS.workdir:
    _fail("--workdir is required: the experiment whose vqvae and priors code the images")
  if command != "likelihood" and not FLAGS.out:
    _fail(f"--out is required for {command}: the folder to write to")
  if not paths:
    _fail(f"{command} needs at least one input file")
  if FLAGS.batch_size < 1:
    _fail(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
  missing = [p for p in paths if not storage.isfile(p)]
  if missing and FLAGS.on_bad_input == registry.BAD_IMAGE_ERROR:  # before the (slow) model load
    _bad(f"{missing[0]}: no such {'stream' if command == 'decompress' else 'image'} file")
  import vqvae2_jax  # pylint: disable=g-import-not-at-top
  from vqvae2_jax.workdir import StageMissingError  # pylint: disable=g-import-not-at-top
  try:
    run = vqvae2_jax.load(FLAGS.workdir)
    {"compress": compress, "decompress": decompress, "likelihood": likelihood}[command](
        run, paths)
  except (StageMissingError, ValueError) as e:
    _fail(str(e))


if __name__ == "__main__":
  app.run(main)
