"""aot.hlo_bytes: bytes of a compiled HLO module with loops at their trip counts.

Synthetic modules in the TPU compiler's text syntax (no libtpu needed); the compiled
programs themselves are checked in test_tpu_compile.py.
"""
from __future__ import annotations

import pytest

from vqvae2_jax.aot import hlo_bytes

# A 4-trip loop over a stacked [4, 8, 128] f32 buffer: each step slices one layer out
# (4 KiB), runs one fusion over it and writes it back in place; the entry computation
# adds one fusion over a [8, 128] f32 array (4 KiB in, 4 KiB out).
LOOP_MODULE = """HloModule jit_step, entry_computation_layout={()->f32[8,128]{1,0}}

%fused_add (param_0.1: f32[8,128]) -> f32[8,128] {
  %param_0.1 = f32[8,128]{1,0:T(8,128)} parameter(0)
  ROOT %add.1 = f32[8,128]{1,0:T(8,128)} add(%param_0.1, %param_0.1)
}

%fused_update (param_0.2: f32[4,8,128], param_1.2: f32[1,8,128], param_2.2: s32[]) -> f32[4,8,128] {
  %param_0.2 = f32[4,8,128]{2,1,0:T(8,128)} parameter(0)
  %param_1.2 = f32[1,8,128]{2,1,0:T(8,128)} parameter(1)
  %param_2.2 = s32[]{:T(128)} parameter(2)
  %constant.9 = s32[]{:T(128)} constant(0)
  ROOT %dynamic-update-slice.1 = f32[4,8,128]{2,1,0:T(8,128)} dynamic-update-slice(%param_0.2, %param_1.2, %param_2.2, %constant.9, %constant.9)
}

%body (param.3: (s32[], f32[4,8,128])) -> (s32[], f32[4,8,128]) {
  %param.3 = (s32[]{:T(128)}, f32[4,8,128]{2,1,0:T(8,128)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%param.3), index=0
  %stack = f32[4,8,128]{2,1,0:T(8,128)} get-tuple-element(%param.3), index=1
  %zero = s32[]{:T(128)} constant(0)
  %layer = f32[1,8,128]{2,1,0:T(8,128)} dynamic-slice(%stack, %i, %zero, %zero), dynamic_slice_sizes={1,8,128}
  %flat = f32[8,128]{1,0:T(8,128)} bitcast(%layer)
  %new = f32[8,128]{1,0:T(8,128)} fusion(%flat), kind=kLoop, calls=%fused_add
  %back = f32[1,8,128]{2,1,0:T(8,128)} bitcast(%new)
  %updated = f32[4,8,128]{2,1,0:T(8,128)} fusion(%stack, %back, %i), kind=kLoop, calls=%fused_update
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%i, %one)
  ROOT %tuple.1 = (s32[]{:T(128)}, f32[4,8,128]{2,1,0:T(8,128)}) tuple(%next, %updated)
}

%condition (param.4: (s32[], f32[4,8,128])) -> pred[] {
  %param.4 = (s32[]{:T(128)}, f32[4,8,128]{2,1,0:T(8,128)}) parameter(0)
  %i.1 = s32[]{:T(128)} get-tuple-element(%param.4), index=0
  %limit = s32[]{:T(128)} constant(4)
  ROOT %lt = pred[]{:T(512)} compare(%i.1, %limit), direction=LT
}

ENTRY %main (Arg_0.1: f32[4,8,128], Arg_1.1: f32[8,128]) -> f32[8,128] {
  %Arg_0.1 = f32[4,8,128]{2,1,0:T(8,128)} parameter(0)
  %Arg_1.1 = f32[8,128]{1,0:T(8,128)} parameter(1)
  %start = s32[]{:T(128)} constant(0)
  %init = (s32[]{:T(128)}, f32[4,8,128]{2,1,0:T(8,128)}) tuple(%start, %Arg_0.1)
  %while.1 = (s32[]{:T(128)}, f32[4,8,128]{2,1,0:T(8,128)}) while(%init), condition=%condition, body=%body
  ROOT %fusion.9 = f32[8,128]{1,0:T(8,128)} fusion(%Arg_1.1), kind=kLoop, calls=%fused_add
}
"""

LAYER = 8 * 128 * 4  # bytes of one [8, 128] f32 layer
SCALAR = 4  # an s32 scalar (its T(128) tile is not charged: XLA counts it as 4 bytes)
# One step: slice (read + write one layer), the fusion (one in, one out), the in-place
# update (the layer in, the layer written, the index), the counter add, the condition.
STEP = 2 * LAYER + 2 * LAYER + (LAYER + SCALAR + LAYER) + 3 * SCALAR + (2 * SCALAR + 1)
ENTRY = 2 * LAYER


def test_shape_bytes_pads_minor_dimensions_to_the_layout_tile():
  assert hlo_bytes.shape_bytes("f32[8,128]{1,0}") == LAYER
  assert hlo_bytes.shape_bytes("f32[2,16]{1,0:T(8,128)}") == 8 * 128 * 4
  assert hlo_bytes.shape_bytes("bf16[3,5,200]{2,1,0:T(8,128)(2,1)}") == 3 * 8 * 256 * 2
  # Layout {0,1}: dimension 0 is minor, so it is the one padded to 128 lanes.
  assert hlo_bytes.shape_bytes("f32[16,128]{0,1:T(8,128)}") == 128 * 128 * 4
  assert hlo_bytes.shape_bytes("(s32[]{:T(128)}, pred[4]{0})") == SCALAR + 4
  assert hlo_bytes.shape_bytes("f32[]") == 4
  on_chip = "(f32[8,128]{1,0:T(8,128)S(1)}, f32[8,128]{1,0:T(8,128)})"
  assert hlo_bytes.shape_bytes(on_chip) == 2 * LAYER
  assert hlo_bytes.shape_bytes(on_chip, hbm_only=True) == LAYER


def test_loops_count_at_their_trip_count_and_slices_count_the_slice():
  with_loops, once = hlo_bytes.loop_bytes(LOOP_MODULE)
  assert once == pytest.approx(STEP + ENTRY)
  assert with_loops == pytest.approx(4 * STEP + ENTRY)


def test_known_trip_count_overrides_the_condition():
  text = LOOP_MODULE.replace(
      "body=%body\n", 'body=%body, backend_config={"known_trip_count":{"n":"7"}}\n')
  assert hlo_bytes.loop_bytes(text)[0] == pytest.approx(7 * STEP + ENTRY)


@pytest.mark.parametrize("condition", ["direction=GT", "direction=LT, extra"])
def test_unreadable_trip_count_counts_the_body_once(condition):
  text = LOOP_MODULE.replace("direction=LT", condition)
  with_loops, once = hlo_bytes.loop_bytes(text)
  expected = 1 if condition == "direction=GT" else 4
  assert with_loops == pytest.approx(expected * STEP + ENTRY) and once == pytest.approx(
      STEP + ENTRY)


def test_a_whole_operand_read_counts_whole():
  # The fusion reads the whole stack (no slice inside it): all 4 layers are charged, and
  # it writes all 4.
  text = LOOP_MODULE.replace(
      "ROOT %dynamic-update-slice.1 = f32[4,8,128]{2,1,0:T(8,128)} dynamic-update-slice("
      "%param_0.2, %param_1.2, %param_2.2, %constant.9, %constant.9)",
      "ROOT %mul.1 = f32[4,8,128]{2,1,0:T(8,128)} multiply(%param_0.2, %param_0.2)")
  _, once = hlo_bytes.loop_bytes(text)
  # The update and the index it no longer uses are not read at all.
  assert once == pytest.approx(STEP - (LAYER + SCALAR + LAYER) + (4 * LAYER + 4 * LAYER)
                               + ENTRY)


def test_text_without_an_entry_computation_is_refused():
  with pytest.raises(ValueError, match="ENTRY"):
    hlo_bytes.loop_bytes("HloModule m\n")


@pytest.mark.parametrize("start, step, trips", [(0, 1, 4), (1, 1, 3), (0, 2, 2), (1, 2, 2)])
def test_trip_count_follows_the_counters_start_and_step(start, step, trips):
  text = LOOP_MODULE.replace("%start = s32[]{:T(128)} constant(0)",
                             f"%start = s32[]{{:T(128)}} constant({start})")
  text = text.replace("%one = s32[]{:T(128)} constant(1)",
                      f"%one = s32[]{{:T(128)}} constant({step})")
  assert hlo_bytes.loop_bytes(text)[0] == pytest.approx(trips * STEP + ENTRY)


def test_a_conditional_counts_its_cheapest_branch():
  cheap = "%cheap (p: f32[8,128]) -> f32[8,128] {\n  ROOT %p = f32[8,128]{1,0} parameter(0)\n}\n"
  text = cheap + LOOP_MODULE.replace(
      "ROOT %fusion.9 = f32[8,128]{1,0:T(8,128)} fusion(%Arg_1.1), kind=kLoop, calls=%fused_add",
      "%flag = pred[]{:T(512)} constant(true)\n"
      "  %fused = f32[8,128]{1,0:T(8,128)} call(%Arg_1.1), to_apply=%expensive\n"
      "  ROOT %c = f32[8,128]{1,0:T(8,128)} conditional(%flag, %Arg_1.1, %Arg_1.1), "
      "branch_computations={%cheap, %expensive}")
  text = text.replace("ENTRY", "%expensive (q: f32[8,128]) -> f32[8,128] {\n"
                      "  %q = f32[8,128]{1,0:T(8,128)} parameter(0)\n"
                      "  ROOT %r = f32[8,128]{1,0:T(8,128)} fusion(%q), kind=kLoop, "
                      "calls=%fused_add\n}\n\nENTRY")
  with_loops, _ = hlo_bytes.loop_bytes(text)
  # The call runs the expensive computation once (2 layers); the conditional's cheapest
  # branch moves nothing.
  assert with_loops == pytest.approx(4 * STEP + 2 * LAYER)


def test_an_asynchronous_copy_counts_one_read_and_one_write():
  """Also: memory space S(1) is on chip, not HBM."""
  text = LOOP_MODULE.replace(
      "ROOT %fusion.9 = f32[8,128]{1,0:T(8,128)} fusion(%Arg_1.1), kind=kLoop, calls=%fused_add",
      "%cs = (f32[8,128]{1,0:T(8,128)S(1)}, f32[8,128]{1,0:T(8,128)}, u32[]{:S(2)}) "
      "copy-start(%Arg_1.1)\n"
      "  ROOT %cd = f32[8,128]{1,0:T(8,128)S(1)} copy-done(%cs)")
  # A prefetch into on-chip memory (S(1)) reads HBM once and writes no HBM.
  assert hlo_bytes.loop_bytes(text)[1] == pytest.approx(STEP + LAYER)
  assert hlo_bytes.loop_bytes(text, hbm_only=False)[1] == pytest.approx(STEP + 2 * LAYER)


def test_breakdown_names_the_source_ops_and_sums_to_the_total():
  meta = ('metadata={op_name="jit(step)/while/body/closed_call/transpose(jvp(Prior))/'
          'stack/layers/layers.vertical/conv_general_dilated"}')
  text = LOOP_MODULE.replace("calls=%fused_update\n", f"calls=%fused_update, {meta}\n")
  module = hlo_bytes.ModuleBytes(text)
  parts = module.breakdown()
  assert sum(parts.values()) == pytest.approx(module.total())
  # The in-place update runs 4 times, under its op_name; the unnamed rest by opcode.
  assert parts["bwd layers.vertical conv_general_dilated"] == pytest.approx(
      4 * (LAYER + SCALAR + LAYER))
  assert parts["(dynamic-slice)"] == pytest.approx(4 * 2 * LAYER)
  (label, share), *_ = module.top_movers(count=1)
  assert share == pytest.approx(parts[label] / module.total())
  assert hlo_bytes.op_label('op_name="jit(step)/jvp(P)/drop/jit(_bernoulli)/xor"') == (
      "fwd dropout mask")


def test_in_place_updates_inside_tuples_and_slices_inside_nested_fusions():
  # The update fusion returns its in-place result inside a tuple: still only the layer
  # is written.
  text = LOOP_MODULE.replace(
      "ROOT %dynamic-update-slice.1 = f32[4,8,128]{2,1,0:T(8,128)} dynamic-update-slice(",
      "%dynamic-update-slice.1 = f32[4,8,128]{2,1,0:T(8,128)} dynamic-update-slice(")
  text = text.replace(
      "%param_2.2, %constant.9, %constant.9)\n}",
      "%param_2.2, %constant.9, %constant.9)\n"
      "  ROOT %out = (f32[4,8,128]{2,1,0:T(8,128)}) tuple(%dynamic-update-slice.1)\n}")
  assert hlo_bytes.loop_bytes(text)[1] == pytest.approx(STEP + ENTRY)
  # The layer fusion reads the stack through a nested fusion that slices it: one layer.
  nested = ("%inner (param_0.7: f32[4,8,128], param_1.7: s32[]) -> f32[8,128] {\n"
            "  %param_0.7 = f32[4,8,128]{2,1,0:T(8,128)} parameter(0)\n"
            "  %param_1.7 = s32[]{:T(128)} parameter(1)\n"
            "  %z = s32[]{:T(128)} constant(0)\n"
            "  %ds = f32[1,8,128]{2,1,0:T(8,128)} dynamic-slice(%param_0.7, %param_1.7, %z, %z)"
            ", dynamic_slice_sizes={1,8,128}\n"
            "  ROOT %b = f32[8,128]{1,0:T(8,128)} bitcast(%ds)\n}\n\n"
            "%outer (param_0.8: f32[4,8,128], param_1.8: s32[]) -> f32[8,128] {\n"
            "  %param_0.8 = f32[4,8,128]{2,1,0:T(8,128)} parameter(0)\n"
            "  %param_1.8 = s32[]{:T(128)} parameter(1)\n"
            "  %f = f32[8,128]{1,0:T(8,128)} fusion(%param_0.8, %param_1.8), kind=kLoop, "
            "calls=%inner\n"
            "  ROOT %a = f32[8,128]{1,0:T(8,128)} add(%f, %f)\n}\n\n")
  text = nested + LOOP_MODULE.replace(
      "%new = f32[8,128]{1,0:T(8,128)} fusion(%flat), kind=kLoop, calls=%fused_add",
      "%new = f32[8,128]{1,0:T(8,128)} fusion(%stack, %i), kind=kLoop, calls=%outer")
  # The fusion now reads one layer of the stack and the index instead of the slice.
  assert hlo_bytes.loop_bytes(text)[1] == pytest.approx(STEP + SCALAR + ENTRY)


def test_an_asynchronous_slice_reads_and_writes_the_slice_only():
  text = LOOP_MODULE.replace(
      "ROOT %fusion.9 = f32[8,128]{1,0:T(8,128)} fusion(%Arg_1.1), kind=kLoop, calls=%fused_add",
      "%ss = ((f32[4,8,128]{2,1,0:T(8,128)}), f32[1,8,128]{2,1,0:T(8,128)S(1)}, u32[]{:S(2)}) "
      "slice-start(%Arg_0.1), slice={[1:2], [0:8], [0:128]}\n"
      "  %sd = f32[1,8,128]{2,1,0:T(8,128)S(1)} slice-done(%ss)\n"
      "  %cat = f32[2,8,128]{2,1,0:T(8,128)} custom-call(%sd, %sd), "
      'custom_call_target="ConcatBitcast"\n'
      "  ROOT %fusion.9 = f32[8,128]{1,0:T(8,128)} fusion(%Arg_1.1), kind=kLoop, calls=%fused_add")
  assert hlo_bytes.loop_bytes(text)[1] == pytest.approx(STEP + LAYER + ENTRY)
  assert hlo_bytes.loop_bytes(text, hbm_only=False)[1] == pytest.approx(
      STEP + 2 * LAYER + ENTRY)


def test_a_fusion_result_kept_on_chip_writes_no_hbm():
  text = LOOP_MODULE.replace("ROOT %fusion.9 = f32[8,128]{1,0:T(8,128)}",
                             "ROOT %fusion.9 = f32[8,128]{1,0:T(8,128)S(1)}")
  assert hlo_bytes.loop_bytes(text)[1] == pytest.approx(STEP + LAYER)
  assert hlo_bytes.loop_bytes(text, hbm_only=False)[1] == pytest.approx(STEP + ENTRY)
