"""`--suggest`: the cheapest remat / grad_accum_steps / fsdp setting whose train step fits.

Order of preference, cheapest first: no remat, then remat='block' (recomputing each block
costs about a third more FLOPs); within each, fsdp=1, then parameters and optimizer state
sharded over up to 8 chips (all-gathers per layer); within each, the fewest microbatches
that fit (accumulation only re-reads the weights per microbatch). The first (remat, fsdp)
pair with a fit wins. Each pair is settled in few compiles, since temporaries grow about
linearly with the microbatch: one compile of the whole batch per chip (fits: done; if not,
the compiler's out-of-memory message says how many bytes of temporaries it needed), one at
the most microbatches (does anything fit?), then the microbatch count this line predicts,
doubled until it fits. Without a number in the message it bisects.
"""
from __future__ import annotations

import re
from typing import Callable

from vqvae2_jax import registry
from vqvae2_jax.aot import report
from vqvae2_jax.aot.topology import Slice

CompileFn = Callable[[list[str]], tuple[list[dict], str]]


def section_name(stage: str) -> str:
  """The config section holding a training stage's levers ('priors.top.train', ...)."""
  if stage == registry.VQVAE:
    return "vqvae_train"
  level = registry.prior_level(stage)
  if level is not None:
    return f"priors.{level}.train"
  raise ValueError(f"--suggest searches the levers of a training stage (vqvae, prior_*), "
                   f"not {stage!r}")


def _section(config) -> tuple[str, object]:
  name = section_name(config.stage)
  level = registry.prior_level(config.stage)
  return name, (config.vqvae_train if level is None else config.priors[level].train)


def overrides(section: str, remat: str, accum: int, fsdp: int) -> list[str]:
  """The --config overrides of one setting."""
  return [f"--config.{section}.remat={remat}", f"--config.{section}.grad_accum_steps={accum}",
          f"--config.mesh.fsdp={fsdp}", "--config.mesh.data=-1"]


def accum_choices(batch: int, chips: int) -> list[int]:
  """Powers of two A with batch divisible by A x chips (microbatch >= 1 per chip)."""
  out, a = [], 1
  while batch % (a * chips) == 0:
    out.append(a)
    a *= 2
  return out


def search(config, slice_: Slice, compile_fn: CompileFn, log=print
           ) -> tuple[list[dict], str]:
  """Compiles settings in order of preference; returns ([the winning row], failure)."""
  section, train = _section(config)
  chips = slice_.chips
  accums = accum_choices(train.batch_size, chips)
  if not accums:
    return [], (f"{section}.batch_size={train.batch_size} does not split over the "
                f"{chips} chips of {slice_.name}")
  fsdps = [1] + [f for f in (8, 4, 2) if f <= chips and chips % f == 0][:1]
  tried: dict[tuple, dict | None] = {}
  last_failure: dict = {}

  def fits(remat: str, fsdp: int, accum: int) -> dict | None:
    key = (remat, fsdp, accum)
    if key not in tried:
      rows, failure = compile_fn(overrides(section, remat, accum, fsdp))
      tried[key] = rows[0] if rows and not failure else None
      last_failure.clear()
      last_failure.update(parse_out_of_memory(failure))
      if tried[key] is not None and "available" not in tried[key]:
        tried[key]["available"] = slice_.chip.hbm_bytes * 0.96  # XLA:TPU's usable share
      row = tried[key]
      if row is not None and row["peak"] > row["available"]:
        # The compile-only check can pass a program whose arguments plus temporaries
        # exceed the chip's HBM (seen at paper batch on v4-8): such a setting is no fit.
        failure = (f"compiled, but its peak {row['peak'] / 2**30:.1f} GiB exceeds the "
                   f"{row['available'] / 2**30:.1f} GiB available per chip")
        last_failure.update(temp=row["temp"], available=row["available"])
        tried[key] = None
      log(report.format_row(row) if tried[key] else
          f"{'':18} {remat:<5} {accum:>5} {fsdp:>4} -- {failure[:160]}")
    return tried[key]

  for remat in registry.REMAT_MODES:  # none first: the cheaper step when both fit
    for fsdp in fsdps:
      index = 0 if fits(remat, fsdp, accums[0]) else None
      temp_one = last_failure.get("temp")  # what the whole batch per chip asked for
      if index is None and len(accums) > 1:
        smallest = fits(remat, fsdp, accums[-1])
        if smallest:
          index = _fewest_microbatches(lambda a: fits(remat, fsdp, accums[a]), smallest,
                                       accums, train.batch_size // chips, temp_one)
      if index is None:
        continue
      best = tried[(remat, fsdp, accums[index])]
      log("suggested: " + " ".join(overrides(section, remat, accums[index], fsdp)))
      return [best], ""
  return [], (f"no setting of remat, grad_accum_steps (up to {accums[-1]}) and fsdp (up to "
              f"{fsdps[-1]}) fits {config.stage} at batch {train.batch_size} on "
              f"{slice_.name}; use a bigger slice or a smaller batch_size")


_TEMP = re.compile(r"required for HLO temporaries \(([\d.]+)G\)")
_AVAILABLE = re.compile(r"exceeds available HBM \(([\d.]+)G\)")


def parse_out_of_memory(failure: str) -> dict:
  """{'temp': bytes of temporaries needed, 'available': HBM bytes} from XLA:TPU's message
  (G = GiB); {} when the failure is not one."""
  temp, available = _TEMP.search(failure), _AVAILABLE.search(failure)
  if not (temp and available):
    return {}
  return {"temp": float(temp.group(1)) * 2**30, "available": float(available.group(1)) * 2**30}


def _fewest_microbatches(fits_at, smallest: dict, accums: list[int], per_chip: int,
                         temp_one: float | None) -> int:
  """Index into accums of the fewest microbatches that fit, given that accums[-1] does
  (its row: `smallest`) and accums[0] does not (asking for `temp_one` bytes of
  temporaries, or None when the message said nothing). fits_at(i) compiles accums[i]."""
  if temp_one and smallest.get("available"):
    # temp(micro) ~ linear between the smallest microbatch (fits) and the whole batch.
    m0, m1 = per_chip / accums[-1], float(per_chip)
    slope = (temp_one - smallest["temp"]) / (m1 - m0)
    room = smallest["available"] - smallest["peak"]
    micro = m0 + (room / slope if slope > 0 else m1)
    index = next((i for i, a in enumerate(accums) if per_chip / a <= micro), len(accums) - 1)
    index = max(index, 1)
    while index < len(accums) - 1 and not fits_at(index):
      index += 1
    return index
  lo, hi = 1, len(accums) - 1  # bisection: accums[hi] fits, accums[0] does not
  while lo < hi:
    mid = (lo + hi) // 2
    if fits_at(mid):
      hi = mid
    else:
      lo = mid + 1
  return hi
