"""The image codec on a trained workdir: rate-distortion vs JPEG / WebP / raw indices, speed.

On `--num_images` validation images of the workdir's data (spread over the split):

* the rate-distortion table (eval/rate_distortion.py): codec bits per pixel (whole stream
  and payload only), PSNR, SSIM; JPEG and WebP at matched bpp and at the codec's PSNR;
  the raw index cost. Written to <out>/report.md and <out>/rate_distortion.png;
* rate vs NLL: each stream's payload against the priors' teacher-forced code length of
  its codes (under the label it carries);
* speed, side by side in one run after a compile warm-up: compress and decompress
  images/s (codes of all levels coded inside the incremental loop; compress with the
  images' own labels, no class search), against sampling the same number of images at
  the same batch size (the decoder's work without the coder) and the teacher-forced
  log_prob (one forward pass per level); and the load average while measuring.

  python benchmarks/bench_codec.py --workdir=runs/demo --out=/tmp/codec_demo
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import vqvae2_jax
from vqvae2_jax.codec import stream
from vqvae2_jax.data.sources import make_source, spread_subset
from vqvae2_jax.eval import rate_distortion as rd


def _timed(fn):
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


def validation_images(run, num: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [n, S, S, 3], int32 [n] labels) spread over the workdir's validation split."""
  source = spread_subset(make_source(run.config.data, "val"), num)
  items = [source.get(i) for i in range(len(source))]
  return np.stack([x for x, _ in items]), np.array([y for _, y in items], np.int32)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True, help="folder for report.md and the PNG")
  parser.add_argument("--num_images", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=16)
  args = parser.parse_args(argv)
  run = vqvae2_jax.load(args.workdir)
  images, labels = validation_images(run, args.num_images)
  n, b = len(images), args.batch_size
  labels = labels if run.codec.conditional else None
  compress = lambda x: run.compress(x, None if labels is None else labels[:len(x)],
                                    batch_size=b)
  # Compile warm-up of every program timed below, at the very shapes timed (stage-1
  # encode / decode batch by the number of images, the loops by --batch_size).
  run.decompress(compress(images))
  run.sample(n, batch_size=b)
  run.log_prob(images, labels)
  run.reconstruct(images)

  load_before = os.getloadavg()
  lat = sum(int(np.prod(s)) for s in run.manifest["shapes"].values())
  header = stream.unpack(compress(images[:b])[0])[0].size_bytes
  result = rd.rate_distortion(
      images, compress, run.decompress, latents_per_image=lat,
      num_codes=int(run.manifest["num_codes"]), header_bytes=header,
      code_length_bits=lambda streams: run.log_prob(
          images, None if labels is None else [stream.unpack(s)[0].label
                                               for s in streams])["bits"])
  _, t_sample = _timed(lambda: run.sample(n, batch_size=b))
  _, t_logp = _timed(lambda: run.log_prob(images, None if labels is None else labels))
  _, t_recon = _timed(lambda: run.reconstruct(images))
  result["speed"].update({
      "sample_images_per_s": n / t_sample, "log_prob_images_per_s": n / t_logp,
      "stage1_reconstruct_images_per_s": n / t_recon, "batch_size": b,
      "loadavg_before": load_before, "loadavg_after": os.getloadavg()})
  os.makedirs(args.out, exist_ok=True)
  rd.plot(result, os.path.join(args.out, "rate_distortion.png"))
  md = rd.render_markdown(result, "rate_distortion.png")
  s = result["speed"]
  md += (f"\nSide by side (batch {b}): sampling {s['sample_images_per_s']:.2f} images/s, "
         f"teacher-forced log_prob {s['log_prob_images_per_s']:.2f} images/s, stage-1 "
         f"reconstruct {s['stage1_reconstruct_images_per_s']:.2f} images/s; decompress / "
         f"sample time ratio {s['sample_images_per_s'] / s['decompress_images_per_s']:.2f}, "
         f"compress / log_prob time ratio "
         f"{s['log_prob_images_per_s'] / s['compress_images_per_s']:.2f}. Load average "
         f"{load_before[0]:.2f} before, {s['loadavg_after'][0]:.2f} after (2 shared "
         "cores).\n")
  with open(os.path.join(args.out, "report.md"), "w") as f:
    f.write(md)
  with open(os.path.join(args.out, "rate_distortion.json"), "w") as f:
    json.dump(result, f, indent=1, default=float)
  print(md)
  return result


if __name__ == "__main__":
  main()
