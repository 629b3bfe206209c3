"""CPU convolutions that avoid XLA:CPU's slow lowerings; values and parameters of nn.Conv.

XLA:CPU runs stride-1 convolutions fast (through YNNPACK or Eigen), but a convolution
with a dilated input (the forward pass of a transposed conv, the input gradient of a
strided conv) and the kernel gradient of 1x1 and transposed convs take slow paths
(benchmarks/README.md, "profile_stage1"). Each layer therefore gets a plan:

* `conv_plan` (FastConv, 'SAME' nn.Conv): 'space_to_depth' for strided convs
  (`strided_conv2d`: XLA's forward and kernel gradient, the input gradient that of the
  same conv written as space-to-depth + a stride-1 conv); 'im2col' for 1x1 convs
  (`fast_conv2d`: the kernel gradient is one matmul of the input with the output
  gradient, k*k shifted slices for larger kernels, float32 sums); 'xla' otherwise.
* `transpose_plan` (FastConvTranspose, 'SAME' nn.ConvTranspose): the forward pass is
  `_block_conv_transpose`, one stride-1 conv whose kernel holds the s*s output phases
  side by side on the output channels, then depth to space; its kernel gradient is
  phase-wise im2col matmuls ('blocks_im2col', `fast_conv_transpose2d`) or autodiff
  ('blocks', a stride-1 kernel-gradient conv, for the thin RGB output layer).

Accelerators always get plan 'xla' (XLA's own convolutions). `fast_conv2d` also serves
the priors' causal convolutions (explicit padding, `fast_gradient_pays`). Layers with
fewer than `MIN_FAST_CHANNELS` input or output channels keep XLA's kernel gradient.
Parameters have nn.Conv's names, shapes and initialisers: checkpoints are interchangeable.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Dtype = Any
Initializer = Callable[..., jax.Array]
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# Below this many input or output channels the im2col matmul is too thin to beat XLA's
# own kernel gradient (RGB input and output layers), so the modules keep XLA's
# (benchmarks/README.md, "What limits training on CPU").
MIN_FAST_CHANNELS = 16


def fast_gradient_pays(in_channels: int, out_channels: int) -> bool:
  """Whether the im2col kernel gradient is the faster one: on the CPU backend, for layers
  of at least MIN_FAST_CHANNELS input and output channels (accelerators keep XLA's)."""
  return (jax.default_backend() == "cpu"
          and min(in_channels, out_channels) >= MIN_FAST_CHANNELS)


def _same_padding(x_shape: Sequence[int], w_shape: Sequence[int],
                  strides: tuple[int, int]) -> list[tuple[int, int]]:
  """(low, high) padding of H and W for 'SAME' (as nn.Conv / lax use)."""
  return lax.padtype_to_pads(tuple(x_shape[1:3]), tuple(w_shape[:2]), strides, "SAME")


def _pads(padding, x_shape, w_shape, strides) -> list[tuple[int, int]]:
  """'SAME' or explicit ((top, bottom), (left, right)) -> explicit pads."""
  if isinstance(padding, str):
    if padding != "SAME":
      raise ValueError(f"padding must be 'SAME' or explicit pairs, got {padding!r}")
    return _same_padding(x_shape, w_shape, strides)
  return [tuple(p) for p in padding]


def _conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding="SAME") -> jax.Array:
  return lax.conv_general_dilated(x, w, strides, _pads(padding, x.shape, w.shape, strides),
                                  dimension_numbers=_DIMENSION_NUMBERS)


def _kernel_grad(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int],
                 strides: tuple[int, int], padding="SAME") -> jax.Array:
  """d(loss)/d(kernel) as im2col(x) contracted with g: float32 [kh, kw, C, O].

  x: [B, H, W, C]; g: [B, OH, OW, O] (the output gradient).
  """
  kh, kw, c, o = kernel_shape
  _, oh, ow, _ = g.shape
  sh, sw = strides
  pads = _pads(padding, x.shape, kernel_shape, strides)
  if (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and pads == [(0, 0), (0, 0)]:
    patches = x
  else:
    (plo_h, phi_h), (plo_w, phi_w) = pads
    xp = jnp.pad(x, ((0, 0), (plo_h, phi_h), (plo_w, phi_w), (0, 0)))
    # Tap (i, j) of the kernel sees input rows i, i + sh, ..., i + sh * (oh - 1).
    taps = [lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + sh * (oh - 1) + 1,
                                         j + sw * (ow - 1) + 1, c), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  dw = jnp.einsum("bhwp,bhwo->po", patches, g, preferred_element_type=jnp.float32)
  return dw.reshape(kh, kw, c, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fast_conv2d(x: jax.Array, w: jax.Array, strides: tuple[int, int] = (1, 1),
                padding="SAME") -> jax.Array:
  """Convolution, NHWC input, HWIO kernel, 'SAME' or explicit zero padding.

  Args:
    x: float [B, H, W, C].
    w: float [kh, kw, C, O], same dtype as x.
    strides: (sh, sw), static Python ints.
    padding: 'SAME', or ((top, bottom), (left, right)) as static Python ints (the causal
      convolutions of the priors).
  Returns:
    [B, OH, OW, O] in x's dtype; identical in value to `lax.conv_general_dilated` with
    that padding. Only the kernel gradient differs in how it is computed (one matmul,
    float32 accumulation, cast back to w's dtype).
  """
  return _conv(x, w, strides, padding)


def _fwd(x, w, strides, padding):
  return _conv(x, w, strides, padding), (x, w)


def _bwd(strides, padding, res, g):
  x, w = res
  # The input gradient is XLA's own transposed convolution, exactly what autodiff emits.
  _, vjp_x = jax.vjp(lambda x_: _conv(x_, w, strides, padding), x)
  (dx,) = vjp_x(g)
  dw = _kernel_grad(x, g, w.shape, strides, padding).astype(w.dtype)
  return dx, dw


fast_conv2d.defvjp(_fwd, _bwd)


def _space_to_depth_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                         padding="SAME") -> jax.Array:
  """The strided convolution `_conv(x, w, strides, padding)` as a stride-1 one.

  The padded input is folded s_h x s_w -> channels (space to depth) and the kernel zero-
  padded to a multiple of the strides and folded alike: [ceil(kh/sh), ceil(kw/sw), sh*sw*C,
  O]. Same values (no FLOPs spent on zeros when the kernel divides by the strides, as the
  4x4 stride-2 convs do). Its input gradient is a stride-1 convolution too, where XLA's own
  for a strided conv dilates the output gradient (a slow CPU lowering).
  """
  b, h, w_, c = x.shape
  kh, kw, _, o = w.shape
  sh, sw = strides
  (plo_h, phi_h), (plo_w, phi_w) = _pads(padding, x.shape, w.shape, strides)
  oh, ow = (h + plo_h + phi_h - kh) // sh + 1, (w_ + plo_w + phi_w - kw) // sw + 1
  fh, fw = -(-kh // sh), -(-kw // sw)  # folded kernel size
  hn, wn = sh * (oh + fh - 1), sw * (ow + fw - 1)  # padded input the folded conv reads
  zero = jnp.zeros((), x.dtype)
  xp = lax.pad(x, zero, ((0, 0, 0), (plo_h, hn - h - plo_h, 0), (plo_w, wn - w_ - plo_w, 0),
                         (0, 0, 0)))  # negative high padding crops rows no output reads
  xs = xp.reshape(b, hn // sh, sh, wn // sw, sw, c).transpose(0, 1, 3, 2, 4, 5)
  xs = xs.reshape(b, hn // sh, wn // sw, sh * sw * c)
  wp = jnp.pad(w, ((0, fh * sh - kh), (0, fw * sw - kw), (0, 0), (0, 0)))
  ws = wp.reshape(fh, sh, fw, sw, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(fh, fw, -1, o)
  return lax.conv_general_dilated(xs, ws, (1, 1), "VALID", dimension_numbers=_DIMENSION_NUMBERS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def strided_conv2d(x: jax.Array, w: jax.Array, strides: tuple[int, int] = (2, 2),
                   padding="SAME") -> jax.Array:
  """`_conv(x, w, strides, padding)` whose input gradient is a stride-1 convolution.

  Args / returns as `fast_conv2d`. The forward pass and kernel gradient are XLA's; the
  input gradient is that of `_space_to_depth_conv` (same linear map, so the same values).
  """
  return _conv(x, w, strides, padding)


def _bwd_strided(strides, padding, res, g):
  x, w = res
  _, vjp_x = jax.vjp(lambda x_: _space_to_depth_conv(x_, w, strides, padding), x)
  _, vjp_w = jax.vjp(lambda w_: _conv(x, w_, strides, padding), w)
  return vjp_x(g)[0], vjp_w(g)[0]


strided_conv2d.defvjp(_fwd, _bwd_strided)  # same forward as fast_conv2d


def _transpose_taps(k: int, s: int) -> list[tuple[int, int]]:
  """Per kernel tap r of a 'SAME' transposed conv (kernel k, stride s): (output phase a,
  input offset d), meaning out[s*i + a] receives x[i + d] * w[r]."""
  pad_len = k + s - 2
  pad_lo = k - 1 if s > k - 1 else -(-pad_len // 2)  # lax.conv_transpose's 'SAME' split
  taps = []
  for r in range(k):
    a = (pad_lo - r) % s
    taps.append((a, (a + r - pad_lo) // s))
  return taps


def _phase_plan(kernel_shape: Sequence[int], strides: tuple[int, int]):
  """How a 'SAME' transposed conv splits into output phases.

  Returns ((top, bottom), (left, right)) zero padding of the input and, per output phase
  (a, b) in raster order, the kernel taps it uses along H and W as [(tap, input offset)],
  offsets consecutive and ascending.
  """
  kh, kw = kernel_shape[:2]
  taps_h, taps_w = _transpose_taps(kh, strides[0]), _transpose_taps(kw, strides[1])
  def pads(taps):
    return max(-min(d for _, d in taps), 0), max(max(d for _, d in taps), 0)
  phases = [(a, b, [(r, d) for r, (p, d) in enumerate(taps_h) if p == a],
             [(q, d) for q, (p, d) in enumerate(taps_w) if p == b])
            for a in range(strides[0]) for b in range(strides[1])]
  return pads(taps_h), pads(taps_w), phases


def _block_plan(k: int, s: int) -> tuple[int, int, int, list[list[tuple[int, int]]]]:
  """Blocks of s consecutive outputs of a 'SAME' transposed conv that read one window.

  Output s*u + c + j (j < s) of block u receives x[u + lo + e] * w[r] for its (r, e) in
  taps[j], e < L: every block reads the same L inputs, so one stride-1 conv with an
  [L, C, s*O] kernel computes all s outputs. The shift c is chosen for the shortest window;
  for k = 4, s = 2 it is 1 and L = 2, so each tap is used once and no FLOP hits a zero.
  Returns (c, lo, L, taps).
  """
  phase = _transpose_taps(k, s)
  best = None
  for c in range(s):
    taps = [[(r, (c + j) // s + d) for r, (a, d) in enumerate(phase) if a == (c + j) % s]
            for j in range(s)]
    offsets = [e for t in taps for _, e in t]
    lo, length = min(offsets), max(offsets) - min(offsets) + 1
    if best is None or length < best[2]:
      best = (c, lo, length, [[(r, e - lo) for r, e in t] for t in taps])
  return best


def _block_conv_transpose(x: jax.Array, w: jax.Array, strides: tuple[int, int]) -> jax.Array:
  """`lax.conv_transpose(x, w, strides, 'SAME')` as one stride-1 convolution.

  x: [B, H, W, C]; w: [kh, kw, C, O] -> [B, sh*H, sw*W, O]. The kernel is gathered into
  [Lh, Lw, C, sh*sw*O] (`_block_plan`, zeros where a block's output skips a window tap),
  the stride-1 conv runs on the input padded to cover every block, and the sh*sw channel
  groups are moved to their output positions (depth to space) and cropped to sh*H x sw*W.
  XLA:CPU runs the stride-1 conv through its fast convolution library; its own transposed
  conv dilates the input first and takes a slow path.
  """
  b, h, w_, c = x.shape
  kh, kw, _, o = w.shape
  (sh, sw), plans = strides, (_block_plan(kh, strides[0]), _block_plan(kw, strides[1]))
  (ch, lo_h, len_h, taps_h), (cw, lo_w, len_w, taps_w) = plans
  # Kernel index of (window row, window col, block row j, block col i); kh*kw = zero tap.
  index = np.full((len_h, len_w, sh, sw), kh * kw, np.int32)
  for j, rows in enumerate(taps_h):
    for i, cols in enumerate(taps_w):
      for r, e in rows:
        for q, f in cols:
          index[e, f, j, i] = r * kw + q
  taps = jnp.concatenate([w.reshape(kh * kw, c, o), jnp.zeros((1, c, o), w.dtype)])
  kernel = taps[index].transpose(0, 1, 4, 2, 3, 5).reshape(len_h, len_w, c, sh * sw * o)
  # Blocks u0..u0+n-1 cover outputs 0..s*H-1; block u reads x[u + lo, u + lo + L).
  u0_h, u0_w = (-1 if ch else 0), (-1 if cw else 0)
  n_h, n_w = (sh * h - 1 - ch) // sh - u0_h + 1, (sw * w_ - 1 - cw) // sw - u0_w + 1
  pads = [(-(u0_h + lo_h), u0_h + n_h + lo_h + len_h - 1 - h),
          (-(u0_w + lo_w), u0_w + n_w + lo_w + len_w - 1 - w_)]
  if any(p < 0 for pair in pads for p in pair):  # crop inputs no block reads
    x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(min(a, 0), min(b, 0), 0)
                                                         for a, b in pads] + [(0, 0, 0)])
  # Zero padding inside the conv: XLA:CPU runs that form faster than pad + 'VALID'.
  y = lax.conv_general_dilated(x, kernel, (1, 1), [(max(a, 0), max(b, 0)) for a, b in pads],
                               dimension_numbers=_DIMENSION_NUMBERS)
  y = y.reshape(b, n_h, n_w, sh, sw, o).transpose(0, 1, 3, 2, 4, 5)
  y = y.reshape(b, n_h * sh, n_w * sw, o)
  top, left = -(sh * u0_h + ch), -(sw * u0_w + cw)
  return y[:, top:top + sh * h, left:left + sw * w_]


def _conv_transpose(x: jax.Array, w: jax.Array, strides: tuple[int, int]) -> jax.Array:
  # XLA's own forward pass: computing it phase by phase as well measured 0.54x as fast
  # for a 256x256 decode on CPU.
  return lax.conv_transpose(x, w, strides, "SAME", dimension_numbers=_DIMENSION_NUMBERS)


def _transpose_kernel_grad(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int],
                           strides: tuple[int, int]) -> jax.Array:
  """d(loss)/d(kernel) of `_conv_transpose`, phase by phase: float32 [kh, kw, C, O].

  x: [B, H, W, C]; g: [B, sh*H, sw*W, O] (the output gradient). Each phase is one im2col
  matmul of shifted views of the input with that phase's output gradient.
  """
  kh, kw, c, o = kernel_shape
  b, h, w, _ = x.shape
  pad_h, pad_w, phases = _phase_plan(kernel_shape, strides)
  xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  grads = {}
  for a, a_w, rows, cols in phases:
    if not rows or not cols:
      continue
    views = [lax.slice(xp, (0, pad_h[0] + dr, pad_w[0] + dq, 0),
                       (b, pad_h[0] + dr + h, pad_w[0] + dq + w, c))
             for _, dr in rows for _, dq in cols]
    patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    phase_g = g[:, a::strides[0], a_w::strides[1]]
    dw = jnp.einsum("bhwp,bhwo->po", patches, phase_g, preferred_element_type=jnp.float32)
    dw = dw.reshape(len(rows), len(cols), c, o)
    for i, (r, _) in enumerate(rows):
      for j, (q, _) in enumerate(cols):
        grads[r, q] = dw[i, j]
  zeros = jnp.zeros((c, o), jnp.float32)  # taps no output position reaches
  return jnp.stack([jnp.stack([grads.get((r, q), zeros) for q in range(kw)])
                    for r in range(kh)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fast_conv_transpose2d(x: jax.Array, w: jax.Array, strides: tuple[int, int] = (2, 2)
                          ) -> jax.Array:
  """`lax.conv_transpose(x, w, strides, 'SAME')` (NHWC, HWIO, kernel not flipped).

  Args:
    x: float [B, H, W, C].
    w: float [kh, kw, C, O], same dtype as x.
    strides: (sh, sw), static Python ints.
  Returns:
    [B, sh*H, sw*W, O] in x's dtype, equal in value to nn.ConvTranspose's (computed as
    `_block_conv_transpose`). The input gradient is XLA's (a strided convolution), the
    kernel gradient phase-wise im2col matmuls with float32 sums.
  """
  return _block_conv_transpose(x, w, strides)


def _fwd_transpose(x, w, strides):
  return _block_conv_transpose(x, w, strides), (x, w)


def _bwd_transpose(strides, res, g):
  x, w = res
  _, vjp_x = jax.vjp(lambda x_: _conv_transpose(x_, w, strides), x)
  (dx,) = vjp_x(g)
  dw = _transpose_kernel_grad(x, g, w.shape, strides).astype(w.dtype)
  return dx, dw


fast_conv_transpose2d.defvjp(_fwd_transpose, _bwd_transpose)

CONV_PLANS = ("xla", "im2col", "space_to_depth")
TRANSPOSE_PLANS = ("xla", "blocks", "blocks_im2col")


def conv_plan(kernel_size: tuple[int, int], strides: tuple[int, int], in_channels: int,
              out_channels: int) -> str:
  """How FastConv computes a layer (one of CONV_PLANS; measurements: benchmarks/README.md).

  Accelerators: 'xla'. CPU: 'space_to_depth' for strided convs (`strided_conv2d`: XLA's
  forward and kernel gradient, a stride-1 input gradient); 'im2col' for 1x1 convs of
  >= MIN_FAST_CHANNELS channels (`fast_conv2d`: the kernel gradient is one matmul, 7x
  XLA's); XLA's own otherwise (for 3x3 convs XLA:CPU's kernel gradient beat im2col).
  """
  if jax.default_backend() != "cpu":
    return "xla"
  if tuple(strides) != (1, 1):
    return "space_to_depth"
  if tuple(kernel_size) == (1, 1) and fast_gradient_pays(in_channels, out_channels):
    return "im2col"
  return "xla"


def transpose_plan(kernel_size: tuple[int, int], strides: tuple[int, int],
                   in_channels: int, out_channels: int) -> str:
  """How FastConvTranspose computes a layer (one of TRANSPOSE_PLANS).

  Accelerators: 'xla' (lax.conv_transpose). CPU: the forward pass is always
  `_block_conv_transpose` (one stride-1 conv); 'blocks_im2col' (`fast_conv_transpose2d`:
  phase-wise im2col kernel gradient) for layers of >= MIN_FAST_CHANNELS channels, 'blocks'
  (autodiff, a stride-1 kernel-gradient conv) for thinner ones such as the RGB output.
  """
  del kernel_size, strides
  if jax.default_backend() != "cpu":
    return "xla"
  return "blocks_im2col" if fast_gradient_pays(in_channels, out_channels) else "blocks"


_CONVOLUTIONS = {"xla": _conv, "im2col": fast_conv2d, "space_to_depth": strided_conv2d}
_TRANSPOSED = {"xla": _conv_transpose, "blocks": _block_conv_transpose,
               "blocks_im2col": fast_conv_transpose2d}


class _CpuConv(nn.Module):
  """Parameters and dispatch shared by FastConv and FastConvTranspose: float32 'kernel'
  [kh, kw, in, out] and 'bias' [out] from the given initialisers (boxed logical names
  kept), the convolution `convolution` picks for the layer."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  def convolution(self, kernel_size, strides, in_channels: int) -> Callable[..., jax.Array]:
    """fn(x, kernel, strides) -> y for this layer on this backend."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"{type(self).__name__} expects NHWC input [B, H, W, C]; got shape "
                       f"{x.shape}. Add or fold batch dimensions before calling it.")
    kernel_size = tuple(self.kernel_size)
    strides = tuple(self.strides) if self.strides is not None else (1, 1)
    if len(kernel_size) != 2 or len(strides) != 2:
      raise ValueError(f"kernel_size and strides must have 2 entries; got {kernel_size}, "
                       f"{strides}")
    kernel = self.param("kernel", self.kernel_init,
                        kernel_size + (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    conv = self.convolution(kernel_size, strides, x.shape[-1])
    return conv(x, kernel, strides) + bias


class FastConv(_CpuConv):
  """`nn.Conv(features, kernel_size, strides, padding='SAME')` computed as `conv_plan`
  says, parameters exactly as nn.Conv names them.

  x: float [B, H, W, in] -> dtype [B, ceil(H / sh), ceil(W / sw), features].
  """

  def convolution(self, kernel_size, strides, in_channels):
    """XLA's conv, `fast_conv2d` or `strided_conv2d` (`conv_plan`)."""
    return _CONVOLUTIONS[conv_plan(kernel_size, strides, in_channels, self.features)]


class FastConvTranspose(_CpuConv):
  """`nn.ConvTranspose(features, kernel_size, strides, padding='SAME')` computed as
  `transpose_plan` says, parameters exactly as nn.ConvTranspose names them.

  x: float [B, H, W, in] -> dtype [B, sh*H, sw*W, features].
  """
  strides: tuple[int, int] = (2, 2)

  def convolution(self, kernel_size, strides, in_channels):
    """lax.conv_transpose, `_block_conv_transpose` or `fast_conv_transpose2d`."""
    return _TRANSPOSED[transpose_plan(kernel_size, strides, in_channels, self.features)]
