"""FastConv equals nn.Conv(padding='SAME') and FastConvTranspose equals
nn.ConvTranspose(padding='SAME'): params tree, values and all three gradients."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vqvae2_jax.models import fast_conv
from vqvae2_jax.models.fast_conv import FastConv, FastConvTranspose

# (batch, height, width, in, out, kernel, stride)
CASES = [
    (1, 5, 7, 3, 4, 1, 1),
    (3, 6, 6, 5, 2, 3, 1),
    (1, 7, 5, 4, 6, 3, 1),
    (3, 8, 8, 3, 5, 4, 2),
    (1, 7, 9, 2, 3, 4, 2),
    (3, 5, 6, 2, 4, 2, 1),
]


@pytest.fixture(autouse=True)
def fast_path_at_every_width(monkeypatch):
  """The cases are narrow (a few channels) to stay cheap: force the im2col gradient on
  them, which the modules otherwise keep for layers of >= MIN_FAST_CHANNELS channels."""
  monkeypatch.setattr(fast_conv, "MIN_FAST_CHANNELS", 0)


def _pair(features, kernel, stride):
  ref = nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), ("kh", "kw", "embed", "mlp")),
                bias_init=nn.with_logical_partitioning(nn.initializers.normal(0.5),
                                                       ("mlp",)))
  fast = FastConv(features, (kernel, kernel), strides=(stride, stride),
                  kernel_init=ref.kernel_init, bias_init=ref.bias_init)
  return ref, fast


def _loss_and_grads(model, params, x, t):
  def loss(params, x):
    y = model.apply({"params": params}, x)
    return jnp.sum(jnp.sin(y) * t), y
  (l, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return l, y, grads


def _check(ref, fast, params, x, t, run):
  l_ref, y_ref, (gp_ref, gx_ref) = run(ref, params, x, t)
  l_fast, y_fast, (gp_fast, gx_fast) = run(fast, params, x, t)
  np.testing.assert_allclose(y_fast, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l_fast, l_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx_fast, gx_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gp_fast["kernel"], gp_ref["kernel"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gp_fast["bias"], gp_ref["bias"], rtol=1e-4, atol=1e-5)


def _inputs(case):
  b, h, w, cin, cout, k, s = case
  kx, kt = jax.random.split(jax.random.PRNGKey(sum(case)))
  x = jax.random.normal(kx, (b, h, w, cin))
  t = jax.random.normal(kt, (b, -(-h // s), -(-w // s), cout))
  return x, t


@pytest.mark.parametrize("case", CASES)
def test_matches_nn_conv_under_jit(case):
  b, h, w, cin, cout, k, s = case
  ref, fast = _pair(cout, k, s)
  x, t = _inputs(case)
  v_ref = ref.init(jax.random.PRNGKey(1), x)
  v_fast = fast.init(jax.random.PRNGKey(1), x)
  # Same tree, same boxed logical names, same shapes and (same init + key) same values.
  assert jax.tree.structure(v_ref) == jax.tree.structure(v_fast)
  for a, c in zip(jax.tree.leaves(v_ref, is_leaf=lambda z: isinstance(z, nn.Partitioned)),
                  jax.tree.leaves(v_fast, is_leaf=lambda z: isinstance(z, nn.Partitioned))):
    assert a.names == c.names
    np.testing.assert_array_equal(a.value, c.value)
  assert v_fast["params"]["kernel"].value.shape == (k, k, cin, cout)
  params = nn.unbox(v_ref)["params"]
  run = jax.jit(_loss_and_grads, static_argnums=0)
  _check(ref, fast, params, x, t, run)


def _n_convs(model, params, x, t):
  f = lambda p, x: jnp.sum(jnp.sin(model.apply({"params": p}, x)) * t)
  grad = jax.jit(jax.grad(f, argnums=(0, 1)))
  return grad.lower(params, x).as_text().count("stablehlo.convolution")


def test_backward_replaces_the_kernel_gradient_convolution(monkeypatch):
  x, t = _inputs((3, 6, 5, 3, 4, 1, 1))
  ref, fast = _pair(4, 1, 1)
  params = nn.unbox(ref.init(jax.random.PRNGKey(2), x))["params"]
  # nn.Conv's gradient program has three convolutions (forward, input and kernel
  # gradients); a 1x1 FastConv's has two, its kernel gradient being a matmul.
  assert (_n_convs(ref, params, x, t), _n_convs(fast, params, x, t)) == (3, 2)
  # A layer narrower than MIN_FAST_CHANNELS keeps XLA's kernel gradient.
  monkeypatch.setattr(fast_conv, "MIN_FAST_CHANNELS", 16)
  assert _n_convs(fast, params, x, t) == 3


def test_cpu_plans_of_the_stage1_layers(monkeypatch):
  """Which path each stage-1 layer takes on CPU (benchmarks/README.md has the timings),
  and that accelerators keep XLA's own convolutions."""
  monkeypatch.setattr(fast_conv, "MIN_FAST_CHANNELS", 16)
  plan = fast_conv.conv_plan
  assert plan((4, 4), (2, 2), 3, 64) == "space_to_depth"     # strided encoder convs
  assert plan((4, 4), (2, 2), 64, 128) == "space_to_depth"
  assert plan((3, 3), (1, 1), 128, 128) == "xla"             # XLA's 3x3 kernel gradient
  assert plan((1, 1), (1, 1), 32, 128) == "im2col"           # residual 1x1s, pre-quant
  assert plan((1, 1), (1, 1), 3, 128) == "xla"
  tplan = fast_conv.transpose_plan
  assert tplan((4, 4), (2, 2), 128, 64) == "blocks_im2col"
  assert tplan((4, 4), (2, 2), 64, 3) == "blocks"           # the RGB output layer
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert plan((4, 4), (2, 2), 64, 128) == plan((1, 1), (1, 1), 32, 128) == "xla"
  assert tplan((4, 4), (2, 2), 128, 64) == "xla"


@pytest.mark.parametrize("plan", fast_conv.CONV_PLANS)
@pytest.mark.parametrize("case", [(2, 7, 9, 3, 4, 4, 2), (1, 8, 8, 2, 3, 3, 2),
                                  (2, 6, 5, 3, 2, 3, 1), (1, 9, 7, 2, 3, 5, 3)])
def test_every_conv_plan_matches_nn_conv(plan, case, monkeypatch):
  """Each way FastConv can compute a layer equals nn.Conv: values and all gradients."""
  monkeypatch.setattr(fast_conv, "conv_plan", lambda *a: plan)
  b, h, w, cin, cout, k, s = case
  ref, fast = _pair(cout, k, s)
  x, t = _inputs(case)
  params = nn.unbox(ref.init(jax.random.PRNGKey(1), x))["params"]
  _check(ref, fast, params, x, t, jax.jit(_loss_and_grads, static_argnums=0))


def _lowered(f, *args) -> str:
  return jax.jit(f).lower(*args).as_text()


def test_strided_conv_input_gradient_is_a_stride_1_conv():
  """XLA's input gradient of a strided conv dilates the output gradient (lhs_dilation,
  a slow CPU path); strided_conv2d's is a stride-1 conv on the space-to-depth input."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  w = jax.random.normal(jax.random.PRNGKey(1), (4, 4, 3, 5))
  def dx(conv):
    return lambda x: jax.grad(lambda x_: jnp.sum(jnp.sin(conv(x_, w, (2, 2)))))(x)
  assert "lhs_dilate = [2, 2]" in _lowered(dx(fast_conv._conv), x)
  assert "lhs_dilate = [2, 2]" not in _lowered(dx(fast_conv.strided_conv2d), x)
  np.testing.assert_allclose(dx(fast_conv.strided_conv2d)(x), dx(fast_conv._conv)(x),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,s,padding", [(4, 2, "SAME"), (3, 2, "SAME"), (5, 3, "SAME"),
                                         (4, 2, ((1, 2), (0, 3))), (2, 2, ((0, 0), (1, 0))),
                                         (3, 1, ((2, 0), (1, 1)))])
def test_space_to_depth_conv_equals_the_strided_conv(k, s, padding):
  x = jax.random.normal(jax.random.PRNGKey(k + s), (2, 9, 8, 3))
  w = jax.random.normal(jax.random.PRNGKey(7), (k, k, 3, 4))
  want = fast_conv._conv(x, w, (s, s), padding)
  got = fast_conv._space_to_depth_conv(x, w, (s, s), padding)
  chex.assert_shape(got, want.shape)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
@pytest.mark.parametrize("case", [(8, 6, 6, 3, 4, 3, 1), (16, 8, 8, 2, 3, 4, 2)])
def test_matches_nn_conv_with_sharded_batch(case):
  devices = np.array(jax.devices()[:8])
  assert devices.size == 8, "conftest must provide 8 fake CPU devices"
  mesh = Mesh(devices, ("data",))
  b, h, w, cin, cout, k, s = case
  ref, fast = _pair(cout, k, s)
  x, t = _inputs(case)
  batch = NamedSharding(mesh, P("data"))
  x, t = jax.device_put(x, batch), jax.device_put(t, batch)
  params = jax.device_put(nn.unbox(ref.init(jax.random.PRNGKey(3), x))["params"],
                          NamedSharding(mesh, P()))
  run = jax.jit(_loss_and_grads, static_argnums=0)
  _check(ref, fast, params, x, t, run)
  _, y, (gp, gx) = run(fast, params, x, t)
  assert y.sharding.is_equivalent_to(batch, y.ndim)
  assert gx.sharding.is_equivalent_to(batch, gx.ndim)


def test_bfloat16_compute_keeps_float32_params():
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 6, 6, 3))
  ref = nn.Conv(4, (3, 3), padding="SAME", dtype=jnp.bfloat16)
  fast = FastConv(4, (3, 3), dtype=jnp.bfloat16)
  params = ref.init(jax.random.PRNGKey(5), x)["params"]
  y_ref, y_fast = ref.apply({"params": params}, x), fast.apply({"params": params}, x)
  assert y_fast.dtype == y_ref.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(y_fast), np.float32(y_ref), rtol=2e-2, atol=2e-2)
  g = jax.grad(lambda p: jnp.sum(fast.apply({"params": p}, x).astype(jnp.float32)))(params)
  g_ref = jax.grad(lambda p: jnp.sum(ref.apply({"params": p}, x).astype(jnp.float32)))(params)
  assert g["kernel"].dtype == jnp.float32
  np.testing.assert_allclose(g["kernel"], g_ref["kernel"], rtol=3e-2, atol=3e-2)


def test_rejects_non_nhwc_input():
  with pytest.raises(ValueError, match="NHWC"):
    FastConv(2, (3, 3)).init(jax.random.PRNGKey(0), jnp.zeros((4, 4, 3)))


def test_layers_conv_on_cpu_keeps_nn_conv_parameter_paths(monkeypatch):
  from vqvae2_jax.models import layers
  x = jnp.zeros((1, 8, 8, 3))
  encoder = layers.Encoder(hidden=8, res_hidden=4, num_res_layers=1, num_down=2)
  assert isinstance(layers.conv(4, 3), FastConv)  # tests run on CPU
  fast = encoder.init(jax.random.PRNGKey(0), x)
  monkeypatch.setattr(layers, "Conv", nn.Conv)  # plain Linen conv ('SAME' by default)
  assert isinstance(layers.conv(4, 3), nn.Conv)
  ref = encoder.init(jax.random.PRNGKey(0), x)
  # Same paths, boxed names, shapes and initial values: checkpoints are interchangeable.
  assert jax.tree.structure(ref) == jax.tree.structure(fast)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(fast)):
    np.testing.assert_array_equal(a, b)
  assert "Conv_0" in fast["params"]


# (batch, height, width, in, out, kernel, stride) of transposed convs; output = stride * input
TRANSPOSE_CASES = [
    (2, 5, 6, 3, 4, 4, 2),   # the paper's 4x4 stride-2 upsampler
    (1, 4, 4, 3, 2, 3, 2),
    (1, 4, 3, 2, 3, 5, 3),
    (2, 3, 3, 2, 2, 2, 2),
    (2, 3, 3, 2, 2, 1, 1),
]


def _transpose_pair(features, kernel, stride):
  init = dict(kernel_init=nn.with_logical_partitioning(
      nn.initializers.lecun_normal(), ("kh", "kw", "embed", "mlp")),
              bias_init=nn.with_logical_partitioning(nn.initializers.normal(0.5), ("mlp",)))
  return (nn.ConvTranspose(features, (kernel, kernel), (stride, stride), padding="SAME",
                           **init),
          FastConvTranspose(features, (kernel, kernel), (stride, stride), **init))


def _transpose_inputs(case):
  b, h, w, cin, cout, k, s = case
  kx, kt = jax.random.split(jax.random.PRNGKey(sum(case)))
  return jax.random.normal(kx, (b, h, w, cin)), jax.random.normal(kt, (b, s * h, s * w, cout))


@pytest.mark.parametrize("case", TRANSPOSE_CASES)
def test_transpose_matches_nn_conv_transpose_under_jit(case):
  _, _, _, cin, cout, k, s = case
  ref, fast = _transpose_pair(cout, k, s)
  x, t = _transpose_inputs(case)
  v_ref, v_fast = ref.init(jax.random.PRNGKey(1), x), fast.init(jax.random.PRNGKey(1), x)
  assert jax.tree.structure(v_ref) == jax.tree.structure(v_fast)
  for a, c in zip(jax.tree.leaves(v_ref, is_leaf=lambda z: isinstance(z, nn.Partitioned)),
                  jax.tree.leaves(v_fast, is_leaf=lambda z: isinstance(z, nn.Partitioned))):
    assert a.names == c.names
    np.testing.assert_array_equal(a.value, c.value)
  params = nn.unbox(v_ref)["params"]
  run = jax.jit(_loss_and_grads, static_argnums=0)
  _check(ref, fast, params, x, t, run)
  # nn.ConvTranspose's kernel gradient is one more convolution; ours is matmuls only.
  def n_convs_x_only(model):
    f = lambda x: jnp.sum(jnp.sin(model.apply({"params": params}, x)) * t)
    return jax.jit(jax.grad(f)).lower(x).as_text().count("stablehlo.convolution")
  assert _n_convs(ref, params, x, t) == n_convs_x_only(ref) + 1
  assert _n_convs(fast, params, x, t) == n_convs_x_only(fast)


def test_transpose_matches_with_sharded_batch():
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  case = (8, 4, 4, 3, 2, 4, 2)
  ref, fast = _transpose_pair(case[4], case[5], case[6])
  x, t = _transpose_inputs(case)
  batch = NamedSharding(mesh, P("data"))
  x, t = jax.device_put(x, batch), jax.device_put(t, batch)
  params = jax.device_put(nn.unbox(ref.init(jax.random.PRNGKey(3), x))["params"],
                          NamedSharding(mesh, P()))
  _check(ref, fast, params, x, t, jax.jit(_loss_and_grads, static_argnums=0))


def test_transpose_upsampler_on_cpu_keeps_nn_conv_transpose_parameter_paths(monkeypatch):
  from vqvae2_jax.models import layers
  x = jnp.zeros((1, 4, 4, 8))
  up = layers.Upsample2x(6, "transpose")
  fast = up.init(jax.random.PRNGKey(0), x)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  ref = up.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(ref) == jax.tree.structure(fast)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(fast)):
    np.testing.assert_array_equal(a, b)
  assert "ConvTranspose_0" in fast["params"]


@pytest.mark.parametrize("mode,kernel", [("down", (2, 3)), ("down_right", (2, 2)),
                                         ("down", (3, 5))])
def test_causal_conv_fast_path_matches_xla(mode, kernel, monkeypatch):
  """CausalConv's explicit causal padding through fast_conv2d (the CPU path) equals the
  plain XLA convolution: values and both gradients."""
  from vqvae2_jax.models import causal
  conv = causal.CausalConv(5, kernel, mode)
  x = jax.random.normal(jax.random.PRNGKey(7), (2, 6, 7, 3))
  t = jax.random.normal(jax.random.PRNGKey(8), (2, 6, 7, 5))
  params = nn.unbox(conv.init(jax.random.PRNGKey(9), x))["params"]
  def run(min_channels):
    monkeypatch.setattr(fast_conv, "MIN_FAST_CHANNELS", min_channels)
    return jax.jit(_loss_and_grads, static_argnums=0)(conv, params, x, t)
  l_fast, y_fast, (gp_fast, gx_fast) = run(0)
  l_ref, y_ref, (gp_ref, gx_ref) = run(10**9)
  np.testing.assert_allclose(y_fast, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx_fast, gx_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gp_fast["kernel"], gp_ref["kernel"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gp_fast["bias"], gp_ref["bias"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("plan", fast_conv.TRANSPOSE_PLANS)
@pytest.mark.parametrize("case", TRANSPOSE_CASES + [(2, 4, 5, 3, 3, 6, 2), (1, 3, 4, 2, 2, 4, 3)])
def test_every_transpose_plan_matches_nn_conv_transpose(plan, case, monkeypatch):
  """Each way FastConvTranspose can compute a layer equals nn.ConvTranspose: values and
  all gradients."""
  monkeypatch.setattr(fast_conv, "transpose_plan", lambda *a: plan)
  _, _, _, cin, cout, k, s = case
  ref, fast = _transpose_pair(cout, k, s)
  x, t = _transpose_inputs(case)
  params = nn.unbox(ref.init(jax.random.PRNGKey(1), x))["params"]
  _check(ref, fast, params, x, t, jax.jit(_loss_and_grads, static_argnums=0))


@pytest.mark.parametrize("k,s", [(4, 2), (3, 2), (2, 2), (5, 2), (6, 2), (4, 3), (5, 3),
                                 (3, 1), (1, 1)])
def test_block_conv_transpose_is_one_stride_1_conv(k, s):
  """`_block_conv_transpose` equals lax.conv_transpose 'SAME' and needs no dilated input;
  for the paper's 4x4 stride-2 upsampler its kernel holds no zeros (no wasted FLOPs)."""
  x = jax.random.normal(jax.random.PRNGKey(k), (2, 5, 4, 3))
  w = jax.random.normal(jax.random.PRNGKey(s), (k, k, 3, 2))
  want = fast_conv._conv_transpose(x, w, (s, s))
  got = fast_conv._block_conv_transpose(x, w, (s, s))
  chex.assert_shape(got, (2, 5 * s, 4 * s, 2))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  text = _lowered(lambda x: fast_conv._block_conv_transpose(x, w, (s, s)), x)
  assert text.count("stablehlo.convolution") == 1
  if s > 1:
    assert f"lhs_dilate = [{s}, {s}]" not in text
  _, _, length, taps = fast_conv._block_plan(k, s)
  if (k, s) == (4, 2):
    assert length == 2 and sorted(r for t in taps for r, _ in t) == [0, 1, 2, 3]
