"""Matmul and convolution FLOPs of a traced program, loops counted as they run.

XLA's `cost_analysis()` counts the body of a while loop once: a prior whose 20 gated
layers run under `nn.scan`, or a step that accumulates gradients over 8 microbatches,
reports a fraction of its work. Counting on the jaxpr instead knows every scan's length,
so `count(jaxpr)` gives the work of one call and `count(jaxpr, loops_once=True)` what XLA
reports; their ratio is the loop multiplicity that `aot.analysis` applies to the
compiler's bytes and roofline time.

Only dot_general and conv_general_dilated are counted (2 FLOPs per multiply-add): the
MXU work that MFU measures. Rematerialised forward passes appear in the jaxpr of a
remat'd step and are counted; the step traced without remat gives the model FLOPs.
"""
from __future__ import annotations

import math
from typing import Any

from jax.extend import core


def _dot_flops(eqn) -> float:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
  rhs_free = math.prod(d for i, d in enumerate(rhs) if i not in rhs_contract + rhs_batch)
  return 2.0 * math.prod(lhs) * rhs_free


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
  per_output = rhs[rhs_spec[1]] * math.prod(rhs[d] for d in rhs_spec[2:])
  return 2.0 * math.prod(out) * per_output


def _sub_jaxprs(params: dict[str, Any]):
  return core.jaxprs_in_params(params)


def count(jaxpr, loops_once: bool = False) -> float:
  """FLOPs of `jaxpr` (a Jaxpr or ClosedJaxpr): scan bodies times their length (once
  with loops_once); a cond counts its most expensive branch; a while loop, whose trip
  count is not static, counts its body once."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    subs = list(_sub_jaxprs(eqn.params))
    if not subs:
      continue
    if name == "cond":
      total += max(count(s, loops_once) for s in subs)
      continue
    times = eqn.params["length"] if name == "scan" and not loops_once else 1
    total += times * sum(count(s, loops_once) for s in subs)
  return total
