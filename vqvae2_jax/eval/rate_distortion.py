"""Rate-distortion of the image codec against JPEG, WebP and the raw index cost.

For a set of images: the codec's bits per pixel (the whole stream, header included) and
the PSNR / SSIM of its reconstructions; JPEG and WebP (Pillow) over a sweep of qualities,
reported as curves and at matched bits per pixel (per image, the quality whose rate is
closest to the codec's) and as the rate they need to reach the codec's PSNR; the raw
index cost, log2 K bits per latent with no prior (same pixels as the codec). Also the
codec's images/s and, given a teacher-forced code length, the payload's gap to it.

Bits per pixel count S*S pixel positions (not 3*S*S colour values). At small sizes
JPEG's fixed header (~600 bytes: tables and markers) dominates its rate; WebP's is ~40.
"""
from __future__ import annotations

import dataclasses
import io
import time
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity

from vqvae2_jax import storage

PLOT_NAME = "rate_distortion.png"  # the evaluate stage's picture of `plot`


@dataclasses.dataclass(frozen=True)
class RateDistortionOptions:
  """Sweep of the reference codecs (Pillow quality settings)."""
  jpeg_qualities: tuple[int, ...] = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95)
  webp_qualities: tuple[int, ...] = (0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95)
  webp_method: int = 6  # slowest, smallest


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per-image PSNR in dB of uint8 [n, S, S, 3] pairs: float64 [n] (inf when equal)."""
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64))**2, axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per-image SSIM (scikit-image, colour channels averaged): float64 [n]."""
  return np.array([structural_similarity(x, y, channel_axis=-1, data_range=255)
                   for x, y in zip(a, b)])


def _pillow(image: np.ndarray, fmt: str, quality: int, method: int) -> tuple[int, np.ndarray]:
  """(bytes, decoded uint8 image) of one image through Pillow's JPEG or WebP."""
  buf = io.BytesIO()
  kwargs = {"quality": quality}
  if fmt == "WEBP":
    kwargs["method"] = method
  Image.fromarray(image).save(buf, format=fmt, **kwargs)
  size = buf.tell()
  buf.seek(0)
  with Image.open(buf) as img:
    return size, np.asarray(img.convert("RGB"), np.uint8)


def reference_curve(images: np.ndarray, fmt: str, qualities: Sequence[int],
                    method: int = 6) -> dict[str, np.ndarray]:
  """bpp, PSNR, SSIM of every image at every quality: float64 [Q, n] each."""
  pixels = images.shape[1] * images.shape[2]
  bpp, pq, sq = [], [], []
  for q in qualities:
    coded = [_pillow(x, fmt, q, method) for x in images]
    decoded = np.stack([d for _, d in coded])
    bpp.append([8.0 * s / pixels for s, _ in coded])
    pq.append(psnr(images, decoded))
    sq.append(ssim(images, decoded))
  return {"quality": np.asarray(qualities), "bpp": np.asarray(bpp), "psnr": np.asarray(pq),
          "ssim": np.asarray(sq)}


def _matched(curve: dict, target_bpp: np.ndarray) -> dict[str, float]:
  """Per image the quality with the rate closest to target_bpp [n]; means over images."""
  pick = np.argmin(np.abs(curve["bpp"] - target_bpp[None]), axis=0)
  cols = np.arange(len(target_bpp))
  return {"bpp": float(curve["bpp"][pick, cols].mean()),
          "psnr": float(_finite_mean(curve["psnr"][pick, cols])),
          "ssim": float(curve["ssim"][pick, cols].mean())}


def _rate_at_psnr(curve: dict, target_psnr: np.ndarray) -> dict[str, float]:
  """Per image the smallest rate of the sweep reaching target_psnr [n]; mean over the
  images where some quality reaches it, and how many did."""
  reach = curve["psnr"] >= target_psnr[None]
  rates = np.where(reach, curve["bpp"], np.inf).min(axis=0)
  ok = np.isfinite(rates)
  return {"bpp": float(rates[ok].mean()) if ok.any() else float("nan"),
          "images_reached": int(ok.sum())}


def _finite_mean(x: np.ndarray) -> float:
  x = x[np.isfinite(x)]
  return float(x.mean()) if x.size else float("inf")


def rate_distortion(images: np.ndarray, compress: Callable[[np.ndarray], list[bytes]],
                    decompress: Callable[[list[bytes]], np.ndarray], *,
                    latents_per_image: int, num_codes: int, header_bytes: int,
                    options: RateDistortionOptions = RateDistortionOptions(),
                    code_length_bits: Callable[[list[bytes]], np.ndarray] | None = None
                    ) -> dict:
  """Rate-distortion figures of the codec and the references on `images`.

  Args:
    images: uint8 [n, S, S, 3].
    compress: images -> one stream (bytes) per image (e.g. `run.compress`).
    decompress: streams -> uint8 [n, S, S, 3] (e.g. `run.decompress`).
    latents_per_image: sum over levels of H_l * W_l.
    num_codes: K (raw index cost log2 K bits per latent).
    header_bytes: bytes of a stream that are not payload (header + checksum).
    options: the JPEG / WebP sweep.
    code_length_bits: optional streams -> float [n] teacher-forced code length of the
      streams' latents (under the labels they carry), for the rate-vs-NLL gap.

  Returns:
    A JSON-serialisable dict: 'rows' (method, bpp, psnr, ssim; the table), 'curves'
    (per quality means), 'speed' (compress / decompress images/s, including each call's
    stage-1 pass, timed on a second identical call so that compilation, whose batch
    shapes depend on n, stays outside the clock),
    'rate_vs_nll' when code_length_bits is given, 'num_images', 'image_size'.
  """
  images = np.asarray(images, np.uint8)
  n, size = len(images), images.shape[1]
  pixels = size * size
  decompress(compress(images))  # compile outside the clock
  t0 = time.perf_counter()
  streams = compress(images)
  t1 = time.perf_counter()
  recon = np.asarray(decompress(streams))
  t2 = time.perf_counter()
  stream_bits = np.array([8.0 * len(s) for s in streams])
  codec_bpp = stream_bits / pixels
  codec_psnr, codec_ssim = psnr(images, recon), ssim(images, recon)
  rows = [
      {"method": "codec (priors + range coder)", "bpp": float(codec_bpp.mean()),
       "psnr": _finite_mean(codec_psnr), "ssim": float(codec_ssim.mean())},
      {"method": "codec payload only (no header)",
       "bpp": float(((stream_bits - 8 * header_bytes) / pixels).mean()),
       "psnr": _finite_mean(codec_psnr), "ssim": float(codec_ssim.mean())},
      {"method": f"raw indices (log2 {num_codes} bits per latent)",
       "bpp": latents_per_image * float(np.log2(num_codes)) / pixels,
       "psnr": _finite_mean(codec_psnr), "ssim": float(codec_ssim.mean())},
  ]
  curves = {}
  for name, fmt, qualities in (("jpeg", "JPEG", options.jpeg_qualities),
                               ("webp", "WEBP", options.webp_qualities)):
    curve = reference_curve(images, fmt, qualities, options.webp_method)
    rows.append({"method": f"{name.upper()} at matched bpp", **_matched(curve, codec_bpp)})
    at = _rate_at_psnr(curve, codec_psnr)
    rows.append({"method": f"{name.upper()} at the codec's PSNR", "bpp": at["bpp"],
                 "psnr": _finite_mean(codec_psnr), "ssim": float("nan"),
                 "images_reached": at["images_reached"]})
    curves[name] = {"quality": curve["quality"].tolist(),
                    "bpp": curve["bpp"].mean(1).tolist(),
                    "psnr": [_finite_mean(p) for p in curve["psnr"]],
                    "ssim": curve["ssim"].mean(1).tolist()}
  result = {"rows": rows, "curves": curves, "num_images": n, "image_size": size,
            "speed": {"compress_images_per_s": n / (t1 - t0),
                      "decompress_images_per_s": n / (t2 - t1)}}
  if code_length_bits is not None:
    nll = np.asarray(code_length_bits(streams), np.float64)
    payload = stream_bits - 8 * header_bytes
    gap = (payload - nll) / nll
    # The range coder's termination (up to two 32-bit words, ~17 bits on average) is a
    # constant per stream: the gap in bits shows it, the relative gap shrinks with size.
    result["rate_vs_nll"] = {
        "nll_bits": float(nll.mean()), "payload_bits": float(payload.mean()),
        "mean_gap": float(gap.mean()), "max_abs_gap": float(np.abs(gap).max()),
        "mean_gap_bits": float((payload - nll).mean()),
        "max_gap_bits": float((payload - nll).max()), "header_bytes": header_bytes}
  return result


def _cell(value, digits: int) -> str:
  """A table cell: '-' for a missing value (NaN, or None once written as JSON)."""
  if value is None or not np.isfinite(value):
    return "-"
  return f"{value:.{digits}f}"


def render_markdown(result: dict, plot_name: str | None = None) -> str:
  """The rate-distortion table (and rate-vs-NLL line) as markdown."""
  lines = [f"## Rate-distortion ({result['num_images']} images, "
           f"{result['image_size']}x{result['image_size']})", "",
           "| method | bits per pixel | PSNR (dB) | SSIM |", "|---|---|---|---|"]
  for r in result["rows"]:
    note = (f" ({r['images_reached']}/{result['num_images']} images reach it)"
            if "images_reached" in r else "")
    lines.append(f"| {r['method']}{note} | {_cell(r['bpp'], 4)} | {_cell(r['psnr'], 2)} | "
                 f"{_cell(r['ssim'], 4)} |")
  s = result["speed"]
  lines += ["", f"Codec speed: compress {s['compress_images_per_s']:.2f} images/s, "
            f"decompress {s['decompress_images_per_s']:.2f} images/s (compilation "
            "excluded)."]
  if "rate_vs_nll" in result:
    g = result["rate_vs_nll"]
    lines.append(f"Payload vs teacher-forced NLL: {g['payload_bits']:.1f} vs "
                 f"{g['nll_bits']:.1f} bits per image: mean gap {100 * g['mean_gap']:+.2f}% "
                 f"({g['mean_gap_bits']:+.1f} bits), max |gap| {100 * g['max_abs_gap']:.2f}% "
                 f"(max {g['max_gap_bits']:+.1f} bits; the coder's termination is up to 64 "
                 f"bits per stream); header {g['header_bytes']} bytes per stream on top.")
  if plot_name:
    lines += ["", f"![rate-distortion]({plot_name})"]
  return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> str:
  """PSNR and SSIM against bits per pixel: JPEG / WebP curves, codec and raw points."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  codec_row, _, raw_row = result["rows"][:3]
  for ax, metric in zip(axes, ("psnr", "ssim")):
    for name, curve in result["curves"].items():
      ax.plot(curve["bpp"], curve[metric], "o-", ms=3, label=name.upper())
    ax.plot([codec_row["bpp"]], [codec_row[metric]], "r*", ms=14, label="codec")
    ax.plot([raw_row["bpp"]], [raw_row[metric]], "ks", ms=7, label="raw indices")
    ax.set_xlabel("bits per pixel")
    ax.set_ylabel("PSNR (dB)" if metric == "psnr" else "SSIM")
    ax.set_xscale("log")
    ticks = [t for t in (0.125, 0.25, 0.5, 1, 2, 4, 8, 16)
             if min(codec_row["bpp"], raw_row["bpp"]) / 2 <= t <= 2 * max(
                 max(c["bpp"]) for c in result["curves"].values())]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(f"{result['num_images']} images, {result['image_size']}px")
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=110)
  plt.close(fig)
  return path
