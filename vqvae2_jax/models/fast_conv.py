"""A 'SAME'-padded 2-D convolution whose weight gradient is one matmul.

XLA's CPU backend lowers the gradient of a convolution w.r.t. its kernel to another
convolution whose "kernel" is the whole output map, and runs it several times slower
than the forward convolution (benchmarks/README.md, "What limits training on CPU").
`fast_conv2d` keeps XLA's forward convolution and input gradient but computes the kernel
gradient as im2col (the kh*kw shifted, strided slices of the padded input concatenated on
the channel axis) times the output gradient, a single matmul with float32 accumulation.

`FastConv` is a drop-in Linen module for `nn.Conv(..., padding='SAME')`: same parameter
names, shapes and initialisers, so checkpoints are interchangeable. Layers with fewer than
`MIN_FAST_CHANNELS` input or output channels keep XLA's gradient, which wins there.

`fast_conv_transpose2d` / `FastConvTranspose` do the same for the paper's strided
transposed convolution (`nn.ConvTranspose(..., padding='SAME')`, kernel not flipped). Its
output position s*i + a only sees kernel taps r with r = pad - a (mod s), so the kernel
gradient splits into s*s output phases, each one im2col matmul over shifted views of the
undilated input: the same FLOPs as the forward pass, none spent on the zeros of a dilated
input.
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
    [B, sh*H, sw*W, O] in x's dtype, identical in value to nn.ConvTranspose's; only the
    kernel gradient is computed differently (phase-wise im2col matmuls, float32 sums).
  """
  return _conv_transpose(x, w, strides)


def _fwd_transpose(x, w, strides):
  return _conv_transpose(x, w, strides), (x, w)


def _bwd_transpose(strides, res, g):
  x, w = res
  _, vjp_x = jax.vjp(lambda x_: _conv_transpose(x_, w, strides), x)
  (dx,) = vjp_x(g)
  dw = _transpose_kernel_grad(x, g, w.shape, strides).astype(w.dtype)
  return dx, dw


fast_conv_transpose2d.defvjp(_fwd_transpose, _bwd_transpose)


class _CpuConv(nn.Module):
  """Parameters and dispatch shared by FastConv and FastConvTranspose: float32 'kernel'
  [kh, kw, in, out] and 'bias' [out] from the given initialisers (boxed logical names
  kept), the fast kernel gradient for layers of >= MIN_FAST_CHANNELS channels."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  def convolutions(self):
    """(fast, plain): the custom-gradient convolution and XLA's own, same signature."""
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
    fast, plain = self.convolutions()
    conv = fast if fast_gradient_pays(x.shape[-1], self.features) else plain
    return conv(x, kernel, strides) + bias


class FastConv(_CpuConv):
  """`nn.Conv(features, kernel_size, strides, padding='SAME')` with `fast_conv2d` inside,
  parameters exactly as nn.Conv names them.

  x: float [B, H, W, in] -> dtype [B, ceil(H / sh), ceil(W / sw), features].
  """

  def convolutions(self):
    """(fast_conv2d, XLA's 'SAME' convolution)."""
    return fast_conv2d, _conv


class FastConvTranspose(_CpuConv):
  """`nn.ConvTranspose(features, kernel_size, strides, padding='SAME')` with
  `fast_conv_transpose2d` inside, parameters exactly as nn.ConvTranspose names them.

  x: float [B, H, W, in] -> dtype [B, sh*H, sw*W, features].
  """
  strides: tuple[int, int] = (2, 2)

  def convolutions(self):
    """(fast_conv_transpose2d, XLA's 'SAME' transposed convolution)."""
    return fast_conv_transpose2d, _conv_transpose
