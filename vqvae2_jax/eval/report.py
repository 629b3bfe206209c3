"""The evaluate stage's outputs: report.json, a readable report.md and the trade-off plot.

`write(report, out_dir)` takes the dict the evaluators filled (`eval.evaluators`) and
writes:
  report.json    every figure, NaN/inf as null
  report.md      Table 1 (NLL / MSE), sample quality, CAS, the rejection trade-off (headed
                 by a warning when it is self-judged: report['self_judged']), notes
  tradeoff.png   paper Figure 7: IS vs FID and precision vs recall per keep fraction,
                 with a second curve per guidance scale (report['guidance'])
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from vqvae2_jax import storage
from vqvae2_jax.registry import SPLITS, TRAIN, VAL
from vqvae2_jax.eval import rate_distortion

MSE_NOTE = ("MSE is per pixel and channel on the [-1, 1] scale the models use; in brackets "
            "mse/4, the [0, 1] scale that the paper's Table 1 MSE figures (0.0047 / 0.0050) "
            "imply.")


def _plain(x: Any) -> Any:
  """JSON-safe copy: numpy scalars/arrays to Python, NaN/inf to None, keys to str."""
  if isinstance(x, dict):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, np.ndarray):
    return _plain(x.tolist())
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(float(x)) else None
  return x


def _f(x, digits: int = 4) -> str:
  """A number for a table cell; '-' when missing."""
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "-"
  if isinstance(x, int):
    return str(x)
  return f"{x:.{digits}g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(r) + " |" for r in rows])


def _table1(t1: dict) -> list[str]:
  lines = ["## Table 1: negative log-likelihood and reconstruction error", ""]
  rows = []
  for level, p in t1.get("priors", {}).items():
    def nll(split, p=p):
      v = p.get(split)
      return f"{_f(v['nll_nats'])} nats / {_f(v['nll_bits'])} bits" if v else "-"
    rows.append([f"{level.capitalize()} prior ({p['params']} params)", nll(TRAIN),
                 nll(VAL), "-", "-"])
  v = t1.get("vqvae", {})
  def mse(split):
    m = v.get(split)
    return f"{_f(m['mse'])} [{_f(m['mse_01'])}]" if m else "-"
  rows.append(["VQ decoder", "-", "-", mse(TRAIN), mse(VAL)])
  lines += _table(["", "Train NLL", "Validation NLL", "Train MSE", "Validation MSE"], rows)
  counts = []
  for level, p in t1.get("priors", {}).items():
    counts.append(f"{level}: " + ", ".join(
        f"{s} {p[s]['num_examples']}" for s in SPLITS if s in p))
  if v:
    counts.append("VQ-VAE: " + ", ".join(f"{s} {v[s]['num_images']} images" for s in v))
  lines += ["", "NLL is the mean per latent on the extracted code shards (nats and bits). "
            + MSE_NOTE, "", "Examples used: " + "; ".join(counts) + "."]
  return lines


def _quality(report: dict) -> list[str]:
  s, nets = report.get("samples"), report.get("networks", {})
  recon = report.get("reconstructions", {})
  if not s and not recon:
    return []
  lines = ["## Sample quality (no rejection sampling)", ""]
  for role, what in (("fid", "FID / IS / FID*"), ("precision_recall", "precision / recall")):
    n = nets.get(role)
    if n:
      lines.append(f"- {what} features: **{n['label']}**, {n['feature_key']} "
                   f"({n['feature_dim']}-d), weights {os.path.basename(n['weights_path'])}")
  lines.append("")
  rows = []
  if s:
    rows += [["FID (samples vs real validation images)", _f(s.get("fid"), 3)],
             ["FID* (samples vs reconstructions of those images)", _f(s.get("fid_star"), 3)]]
  rows.append(["FID (reconstructions vs originals)", _f(recon.get("fid"), 3)])
  if s and "is_mean" in s:
    rows.append([f"Inception Score ({s['is_splits']} splits)",
                 f"{_f(s['is_mean'], 3)} ± {_f(s['is_std'], 2)}"])
  if s and "precision" in s:
    k = report.get("settings", {}).get("pr_k", 3)
    rows += [[f"Precision (k={k})", _f(s["precision"], 3)], [f"Recall (k={k})", _f(s["recall"], 3)]]
  lines += _table(["Metric", "Value"], rows)
  lines += ["", f"Samples: {s['num_images'] if s else 0}; real validation images: "
            f"{recon.get('num_images', 0)}."]
  return lines


def _cas(report: dict) -> list[str]:
  c = report.get("cas")
  if not c:
    return []
  names = {"sample_trained_on_real": ("generated samples", "real validation images"),
           "sample_trained_on_recon": ("generated samples", "reconstructed validation images"),
           "real_trained_on_real": ("real training images", "real validation images"),
           "real_trained_on_recon": ("real training images", "reconstructed validation images")}
  rows = [[*names[k], f"{100 * v['top1']:.2f}", f"{100 * v['top5']:.2f}", str(v["num_images"])]
          for k, v in c.items() if k in names]
  return (["## Classification Accuracy Score (paper Table 2)", ""]
          + _table(["Classifier trained on", "Tested on", "Top-1 %", "Top-5 %", "Images"], rows))


def _tradeoff(report: dict, plot_name: str | None) -> list[str]:
  rows = (report.get("tradeoff") or []) + (report.get("guidance") or [])
  if len(rows) < 2:
    return []
  k = report.get("settings", {}).get("pr_k", 3)
  lines = ["## Classifier-based rejection sampling (paper Figure 7)", ""]
  if report.get("self_judged"):
    lines += [f"> **WARNING** {report.get('self_judged_warning', 'SELF-JUDGED trade-off')}",
              ""]
  lines += [f"Rejection classifier: {report.get('rejection_classifier', '-')}. Keep fraction f: "
            "of the first ceil(num_images / f) candidates, each class keeps its best by "
            "p(class | image), as many as it has among the first num_images (so about the "
            "fraction f of its candidates, and every row holds num_images images).", ""]
  if report.get("guidance"):
    lines += ["Guidance w: classifier-free guidance scale the samples were drawn at (1 = "
              "none).", ""]
  lines += ["Cost: prior passes per accepted image relative to one unguided sample "
            "(candidates / accepted, x2 under guidance). s / image: measured wall-clock "
            "seconds per accepted image on this machine (sampling every candidate, plus "
            "scoring them when rejecting; compilation excluded). CAS: top-1 % on the real "
            "validation images of a classifier trained on that row's samples only.", ""]
  with_cas = any(r.get("cas_top1") is not None for r in rows)
  head = ["Keep fraction", "Guidance w", "Candidates", "Accepted", "Cost", "s / image",
          "Mean p(class)", "FID", "FID*", "IS", f"Precision (k={k})", "Recall"]
  lines += _table(head + (["CAS top-1 %"] if with_cas else []),
                  [[_f(r["keep_fraction"], 3), _f(r.get("guidance", 1.0), 3),
                    str(r["candidates"]), str(r["num_images"]),
                    _f(r.get("sampling_cost"), 3), _f(r.get("seconds_per_image"), 4),
                    _f(r.get("mean_class_score"), 3), _f(r.get("fid"), 3),
                    _f(r.get("fid_star"), 3), _f(r.get("is_mean"), 3),
                    _f(r.get("precision"), 3), _f(r.get("recall"), 3)]
                   + ([_f(None if r.get("cas_top1") is None else 100 * r["cas_top1"], 2)]
                      if with_cas else []) for r in rows])
  if plot_name:
    lines += ["", f"![trade-off]({plot_name})"]
  if report.get("guidance_grid"):
    lines += ["", "Each class's first draws at every guidance scale (same class and sampling "
              f"key across a group): ![guidance]({report['guidance_grid']})"]
  return lines


def render_markdown(report: dict, plot_name: str | None = None) -> str:
  """The human-readable report."""
  lines = [f"# VQ-VAE-2 evaluation: {report.get('experiment') or 'experiment'}", "",
           f"Workdir `{report.get('workdir')}`, stage-1 checkpoint step "
           f"{report.get('vqvae_step')}.", ""]
  for part in (_table1(report.get("table1", {})), _quality(report), _cas(report),
               _tradeoff(report, plot_name)):
    if part:
      lines += part + [""]
  if report.get("rate_distortion"):
    lines += [rate_distortion.render_markdown(report["rate_distortion"],
                                              rate_distortion.PLOT_NAME)]
  notes = report.get("notes") or []
  if notes:
    lines += ["## Notes and skipped sections", ""] + [f"- {n}" for n in notes] + [""]
  return "\n".join(lines)


def plot_tradeoff(rows: list[dict], path: str, fid_label: str = "FID",
                  guidance_rows: list[dict] = ()) -> str | None:
  """Figure 7: (a) IS against FID, (b) precision against recall, and (c) CAS against the
  measured sampling seconds per accepted image where both are known, one point per keep
  fraction (and a second curve, one point per guidance scale, for `guidance_rows`).
  Returns the path, or None when no row has the figures to plot."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = [("fid", "is_mean", fid_label, "Inception Score", "(a) IS vs FID"),
            ("recall", "precision", "Recall", "Precision", "(b) Precision vs recall"),
            ("seconds_per_image", "cas_top1", "Seconds per accepted image (measured)",
             "CAS top-1 (classifier trained on the samples)", "(c) CAS vs sampling cost")]
  panels = [p for p in panels if any(r.get(p[0]) is not None and r.get(p[1]) is not None
                                     for r in list(rows) + list(guidance_rows))]
  curves = [(rows, "keep_fraction", "keep", "tab:blue", "rejection"),
            (guidance_rows, "guidance", "w", "tab:orange", "guidance")]
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
  for ax, (xk, yk, xl, yl, title) in zip(axes[0], panels):
    for curve, key, tag, color, name in curves:
      pts = [(r[xk], r[yk], r[key]) for r in curve
             if r.get(xk) is not None and r.get(yk) is not None]
      if not pts:
        continue
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=name)
      for x, y, f in pts:
        ax.annotate(f"{tag} {f:g}", (x, y), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
    if guidance_rows:
      ax.legend(fontsize=8)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title(title)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=100)
  plt.close(fig)
  return path


def write(report: dict, out_dir: str) -> dict:
  """Writes report.json, tradeoff.png (when there is a trade-off) and report.md."""
  storage.makedirs(out_dir)
  report = _plain(report)
  plot_name = None
  if len((report.get("tradeoff") or []) + (report.get("guidance") or [])) > 1:
    net = (report.get("networks") or {}).get("fid") or {}
    label = "FID" if net.get("comparable_with_published") else f"FID ({net.get('name')} features)"
    if report.get("self_judged"):
      label += ", SELF-JUDGED"
    rejection_rows = report.get("tradeoff") or []
    # The guidance curve starts at the unrejected samples of the sampler's own scale.
    guidance_rows = report.get("guidance") or []
    if guidance_rows:
      guidance_rows = [r for r in rejection_rows if r["keep_fraction"] == 1.0] + guidance_rows
    if plot_tradeoff(rejection_rows, storage.join(out_dir, "tradeoff.png"), label,
                     guidance_rows):
      plot_name = "tradeoff.png"
  report["tradeoff_plot"] = plot_name
  storage.write_text(storage.join(out_dir, "report.json"), json.dumps(report, indent=2))
  storage.write_text(storage.join(out_dir, "report.md"), render_markdown(report, plot_name))
  return report
