"""Hierarchical VQ-VAE: shapes per level, encode/decode API, level subsets, paper sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae2_jax.models.vqvae import VQVAE2, level_strides
from vqvae2_jax import builders

from helpers import load_config


def tiny(num_levels, upsample="subpixel"):
  return VQVAE2(num_levels=num_levels, hidden=8, res_hidden=4, num_res_layers=1,
                num_codes=8, code_dim=4, upsample=upsample)


@pytest.mark.parametrize("num_levels,upsample", [(1, "resize"), (2, "subpixel"),
                                                 (3, "transpose")])
def test_shapes_and_api(num_levels, upsample):
  model = tiny(num_levels, upsample)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1)
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x, train=False))(x)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert out.reconstruction.shape == x.shape
  strides = level_strides(num_levels)
  assert [c.shape for c in out.codes] == [(2, 32 // s, 32 // s) for s in strides]
  assert out.perplexity.shape == out.usage.shape == (num_levels,)
  apply = jax.jit(model.apply, static_argnames="method")
  codes = apply(variables, x, method=model.encode)
  for a, b in zip(codes, out.codes):
    np.testing.assert_array_equal(a, b)
  from_codes = apply(variables, codes, method=model.decode_codes)
  np.testing.assert_allclose(from_codes, out.reconstruction, atol=1e-5)
  np.testing.assert_allclose(apply(variables, x, method=model.reconstruct),
                             out.reconstruction, atol=1e-5)


def test_level_subsets_zero_the_other_levels():
  model = tiny(3)
  x = jax.random.uniform(jax.random.PRNGKey(0), (1, 32, 32, 3), minval=-1, maxval=1)
  variables = model.init(jax.random.PRNGKey(1), x, train=False)
  codes = model.apply(variables, x, method=model.encode)
  top_only = model.apply(variables, codes, (True, False, False), method=model.decode_codes)
  # Changing a level that is masked out cannot change the picture; the kept one does.
  other = (codes[0], (codes[1] + 1) % 8, (codes[2] + 3) % 8)
  np.testing.assert_allclose(
      model.apply(variables, other, (True, False, False), method=model.decode_codes),
      top_only, atol=1e-6)
  full = model.apply(variables, codes, method=model.decode_codes)
  assert not np.allclose(full, top_only)


def test_lower_level_depends_on_level_above():
  """The bottom encoder sees the quantized top: other top embeddings move bottom codes."""
  model = tiny(2)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1)
  variables = model.init(jax.random.PRNGKey(1), x, train=False)
  codes = model.apply(variables, x, method=model.encode)
  stats = jax.tree.map(lambda a: a, variables["vq_stats"])
  stats["quantizers_0"]["codebook"] = stats["quantizers_0"]["codebook"] * 50.0
  moved = model.apply({**variables, "vq_stats": stats}, x, method=model.encode)
  assert not np.array_equal(moved[1], codes[1])


def test_bad_image_shape_is_a_clear_error():
  model = tiny(2)
  with pytest.raises(ValueError, match="divisible by 8"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 20, 20, 3)), train=False)


@pytest.mark.parametrize("experiment,levels", [("imagenet256", [(32, 32), (64, 64)]),
                                               ("ffhq1024", [(32, 32), (64, 64), (128, 128)])])
def test_paper_size_vqvae_shape_checks(experiment, levels):
  config = load_config(experiment, "vqvae")
  model = builders.build_vqvae(config)
  size = config.data.image_size
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert [tuple(c.shape[1:]) for c in out.codes] == levels
  assert out.reconstruction.shape == (2, size, size, 3)
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
  books = variables["vq_stats"]
  assert all(books[f"quantizers_{l}"]["codebook"].shape == (512, 64) for l in range(len(levels)))
  print(f"{experiment} VQ-VAE parameters: {count / 1e6:.2f}M")
  assert 1e5 < count < 1e8
