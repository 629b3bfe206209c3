"""Where the incremental sampler spends its time: XLA:CPU thunk durations per op group.

Runs `sample_incremental` once under `jax.profiler.trace` (after a compile run) for one
of bench_sampling's priors, sums the duration of every executed thunk, and attributes it
through the compiled HLO's metadata to the module method or sampler scope that emitted
it (e.g. `layers.horizontal taps`, `attn.queries`, `attend_cached`, `choose`), split by
how often it ran: once, per row or per position. Also prints one teacher-forced forward
pass of the same batch, so the groups read as fractions of a forward pass.

  python benchmarks/profile_sampling.py --prior top32 --batch 16
  python benchmarks/profile_sampling.py --prior cond64 --batch 16 --top 30
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np
from jax.profiler import ProfileData

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sampling as bs  # noqa: E402  pylint: disable=g-import-not-at-top

from vqvae2_jax.models import prior_decoding  # noqa: E402
from vqvae2_jax.sampling import draw as draw_lib  # noqa: E402
from vqvae2_jax.sampling import incremental  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"")


_OFTEN = ("once", "per row", "per position")  # loop nesting depth of the op
# Named scopes of the decoding step (the prior's) and of the loop around it.
_SCOPES = prior_decoding.PROFILE_SCOPES + incremental.PROFILE_SCOPES


def op_groups(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (group, how often it runs). The group is the op_name's
  innermost module methods / named scopes (digits dropped, so layers_3.vertical and
  layers_7.vertical pool); how often follows from the number of enclosing while loops."""
  groups = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    op_name = m.group(2)
    depth = min(op_name.count("while/body"), 2)
    path = [p for p in op_name.split("/") if p not in ("while", "body", "closed_call",
                                                         "cond", "branch")]
    path = [re.sub(r"_\d+", "", p) for p in path[1:]]  # drop jit(...)
    scoped = [p for p in path if "." in p or p in _SCOPES]
    group = " ".join(scoped[-2:]) if scoped else (path[-1] if path else "?")
    groups[m.group(1)] = (group, _OFTEN[depth])
  return groups


def main():
  """Profiles one prior's incremental sampler and prints the op-group table."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--prior", default="top32", help="one of bench_sampling's priors")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--top", type=int, default=25, help="rows of the table")
  args = ap.parse_args()
  ns = argparse.Namespace(num_codes=512, demo_hidden=64, demo_top=8, demo_bottom=16,
                          top_hidden=72, cond_hidden=96, top_size=32, top_layers=10,
                          attention_every=5, cond_size=64, cond_layers=10, cond_blocks=4)
  model, size = bs.priors(ns)[args.prior]
  b = args.batch
  params, codes, cond, labels = bs._params(model, b, size, size)
  kw = dict(shape=(b, size, size), cond_codes=cond, labels=labels)
  key = jax.random.key(0)
  run = lambda: incremental.sample_incremental(model, params, key, **kw)
  forward = jax.jit(lambda p, c: model.apply({"params": p}, c, cond, labels, train=False))
  t_fwd, t_inc = bs._time(lambda: forward(params, codes), 2), bs._time(run, 2)
  hlo = incremental._sample.lower(
      model, draw_lib.plain_params(params), key, tuple(cond), labels, np.float32(1),
      np.float32(1), np.float32(1), shape=kw["shape"], top_k=0, nucleus=False,
      return_logits=False, sharding=None, guided=False).compile().as_text()
  groups = op_groups(hlo)
  trace_dir = tempfile.mkdtemp()
  with jax.profiler.trace(trace_dir):
    t = time.perf_counter()
    jax.block_until_ready(run())
    t_traced = time.perf_counter() - t
  data = ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
  total, count = collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for ev in line.events:
        name = ev.name
        if name.startswith(("end:", "while", "ThunkExecutor", "SlinkyThreadPool")):
          continue
        total[name] += ev.duration_ns * 1e-9
        count[name] += 1
  by_group, runs = collections.Counter(), {}
  for name, sec in total.items():
    g = groups.get(name, (re.sub(r"\.\d+$", "", name), "?"))
    by_group[g] += sec
    runs[g] = runs.get(g, 0) + count[name]
  busy = sum(total.values())
  print(f"{args.prior} {size}x{size} batch {b}: forward pass {t_fwd:.3f} s, incremental "
        f"{t_inc:.3f} s = {t_inc / t_fwd:.2f} forward passes (traced run {t_traced:.3f} s, "
        f"thunks busy {busy:.3f} s); load {bs._load()}")
  header = f"{'op group':<44}{'runs':>14}{'thunks':>9}{'s':>8}{'% busy':>8}{'x fwd':>7}"
  bs._print_header(header)
  for (g, often), sec in by_group.most_common(args.top):
    print(f"{g[:43]:<44}{often:>14}{runs[(g, often)]:>9}{sec:>8.3f}{100 * sec / busy:>8.1f}"
          f"{sec / t_fwd:>7.2f}")


if __name__ == "__main__":
  main()
