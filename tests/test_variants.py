"""The quantizer, the causal layers and the samplers give the same results jitted and not.

`chex.variants` runs each test once under `jax.jit` and once op by op (`without_jit`), so a
trace-time branch, a Python-side shape assumption or a concrete-value dependence that only
one mode takes shows up as a mismatch.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np

from vqvae2_jax.models import causal
from vqvae2_jax.models.prior import PixelSNAILPrior
from vqvae2_jax.models.quantizer import VectorQuantizerEMA, lookup_codes, nearest_codes
from vqvae2_jax.sampling import draw as draw_lib
from vqvae2_jax.sampling.incremental import sample_incremental

from helpers import numpy_params


class QuantizerVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_nearest_codes_and_lookup(self):
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(2, 4, 4, 8)), jnp.float32)
    codebook = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    codes = self.variant(nearest_codes)(z, codebook)
    chex.assert_shape(codes, (2, 4, 4))
    brute = np.argmin(((np.asarray(z)[..., None, :] - np.asarray(codebook))**2).sum(-1), -1)
    np.testing.assert_array_equal(codes, brute)
    chex.assert_trees_all_equal(self.variant(lookup_codes)(codes, codebook),
                                jnp.asarray(np.asarray(codebook)[brute]))

  @chex.variants(with_jit=True, without_jit=True)
  def test_training_step_updates_the_ema_codebook(self):
    vq = VectorQuantizerEMA(num_codes=8, code_dim=4, decay=0.9)
    z = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 3, 4)), jnp.float32)
    variables = vq.init(jax.random.PRNGKey(0), z, train=False)

    def step(variables, z):
      out, updates = vq.apply(variables, z, train=True, mutable=["vq_stats"])
      return out.quantized, out.codes, updates

    quantized, codes, updates = self.variant(step)(variables, z)
    chex.assert_shape(quantized, z.shape)
    chex.assert_tree_all_finite(updates)
    assert not np.allclose(updates["vq_stats"]["codebook"], variables["vq_stats"]["codebook"])
    # The variant under test equals the eager call.
    with jax.disable_jit():
      plain_q, plain_c, plain_u = step(variables, z)
    chex.assert_trees_all_close((quantized, updates), (plain_q, plain_u), atol=1e-6)
    np.testing.assert_array_equal(codes, plain_c)


class CausalVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_causal_conv_and_attention(self):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 5, 6)), jnp.float32)
    for mode, kernel in (("down", (2, 3)), ("down_right", (2, 2))):
      conv = causal.CausalConv(4, kernel, mode)
      params = conv.init(jax.random.PRNGKey(0), x)
      out = self.variant(conv.apply)(params, x)
      chex.assert_shape(out, (2, 5, 5, 4))
      # Causality: the output at the first raster position sees nothing of the input
      # but (down_right) its own left/top neighbours, all padding there.
      if mode == "down":
        moved = x.at[:, 1:].set(0.0)
        chex.assert_trees_all_close(self.variant(conv.apply)(params, moved)[:, 0],
                                    out[:, 0], atol=1e-6)
    attn = causal.CausalSelfAttention(8, 2)
    seq = jnp.asarray(np.random.default_rng(3).normal(size=(2, 9, 8)), jnp.float32)
    attn_params = attn.init(jax.random.PRNGKey(1), seq, seq, train=False)
    out = self.variant(lambda p, q, kv: attn.apply(p, q, kv, train=False))(
        attn_params, seq, seq)
    chex.assert_shape(out, (2, 9, 8))
    # Strictly causal: changing position 5 changes no output before it.
    changed = seq.at[:, 5].add(1.0)
    out2 = self.variant(lambda p, q, kv: attn.apply(p, q, kv, train=False))(
        attn_params, changed, changed)
    chex.assert_trees_all_close(out2[:, :5], out[:, :5], atol=1e-6)
    assert not np.allclose(out2[:, 6:], out[:, 6:])  # later positions do see it


class SamplerVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_filter_logits(self):
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(3, 10)), jnp.float32)
    out = self.variant(draw_lib.filter_logits, static_argnames="top_k")(
        logits, 0.7, top_k=4, top_p=0.8)
    kept = np.isfinite(np.asarray(out))
    assert (kept.sum(-1) <= 4).all() and (kept.sum(-1) >= 1).all()
    chex.assert_trees_all_close(jnp.where(kept, out, 0.0),
                                jnp.where(kept, logits / 0.7, 0.0), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_incremental_sampler_reproducible(self):
    prior = PixelSNAILPrior(num_codes=6, hidden=8, res_hidden=8, num_layers=1,
                            attention_every=1, num_heads=2, num_classes=2)
    codes = jnp.zeros((2, 4, 4), jnp.int32)
    labels = jnp.asarray([0, 1], jnp.int32)
    params = numpy_params(prior, codes, (), labels)
    sample = self.variant(lambda p, rng: sample_incremental(
        prior, p, rng, shape=(2, 4, 4), labels=labels))
    a = sample(params, jax.random.PRNGKey(5))
    b = sample(params, jax.random.PRNGKey(5))
    chex.assert_shape(a, (2, 4, 4))
    np.testing.assert_array_equal(a, b)
    assert int(a.max()) < 6 and int(a.min()) >= 0
