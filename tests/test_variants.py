"""The quantizer, stage 1, the prior, their losses and the samplers: jitted = op by op.

`chex.variants(with_jit=True, without_jit=True)` runs every test twice, the function under
test going through `self.variant`, and each run compares it with the same function run the
other way (`JitEagerTestCase.variant_and_other`):

  with_jit:     jax.jit(fn)                        vs  fn under jax.disable_jit()
  without_jit:  fn under jax.disable_jit()         vs  jax.jit(fn)

The eager side runs under `jax.disable_jit()` so that the jits inside the library (the
samplers' compiled loops) and the lax loops and scans run op by op too, not as one
compiled program. A probe inside fn records whether it was handed tracers, so each run
also checks that the jitted side was traced and the eager side saw concrete arrays. A
trace-time branch, a Python-side shape assumption or a concrete-value dependence that only
one mode takes shows up as a mismatch beyond float tolerance (codes: exactly equal).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqvae2_jax import builders
from vqvae2_jax import images as image_lib
from vqvae2_jax.models import causal
from vqvae2_jax.models.prior import PixelSNAILPrior
from vqvae2_jax.models.quantizer import VectorQuantizerEMA, lookup_codes, nearest_codes
from vqvae2_jax.sampling import draw as draw_lib
from vqvae2_jax.sampling.incremental import run_incremental, sample_incremental
from vqvae2_jax.train import losses
from vqvae2_jax.train import state as state_lib

from helpers import load_config, numpy_params

ATOL = RTOL = 1e-5  # float32 op by op vs fused: reassociation only


class Probe:
  """Records, for every array handed to it, whether it was a tracer; returns it unchanged."""

  def __init__(self):
    self.traced: list[bool] = []

  def __call__(self, x):
    self.traced.append(isinstance(x, jax.core.Tracer))
    return x


class JitEagerTestCase(chex.TestCase):

  def variant_and_other(self, fn: Callable[..., Any], *args):
    """(fn(probe, *args) through the variant under test, the same run the other way).

    Asserts each side ran as named: every probe call of the jitted side saw a tracer,
    every one of the eager side a concrete array. Returns (the variant's result, the other).
    """
    jitted = self.variant.type is chex.ChexVariantType.WITH_JIT
    mine, other = Probe(), Probe()
    if jitted:
      got = self.variant(functools.partial(fn, mine))(*args)
      with jax.disable_jit():
        want = fn(other, *args)
    else:
      with jax.disable_jit():
        got = self.variant(functools.partial(fn, mine))(*args)
      want = jax.jit(functools.partial(fn, other))(*args)
    for probe, traced in ((mine, jitted), (other, not jitted)):
      assert probe.traced, "the probe was never called"
      assert all(t == traced for t in probe.traced), (jitted, probe.traced)
    return got, want

  def assert_jit_equals_eager(self, fn: Callable[..., Any], *args, exact=lambda out: (),
                              atol: float = ATOL, rtol: float = RTOL):
    """variant_and_other, then the results equal within float tolerance, and the leaves
    `exact(result)` picks (codes) bit for bit. Returns the variant's result."""
    got, want = self.variant_and_other(fn, *args)
    chex.assert_trees_all_equal_structs(got, want)
    chex.assert_trees_all_equal(exact(got), exact(want))
    chex.assert_trees_all_close(got, want, atol=atol, rtol=rtol)
    return got


class HarnessVariantsTest(JitEagerTestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_a_result_that_depends_on_the_mode_fails(self):
    """The comparison sees a difference of 1e-4 between the jitted and the eager run."""
    def mode_dependent(probe, x):
      return x + (1e-4 if isinstance(probe(x), jax.core.Tracer) else 0.0)
    with self.assertRaises(AssertionError):
      self.assert_jit_equals_eager(mode_dependent, jnp.ones(3))


class QuantizerVariantsTest(JitEagerTestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_nearest_codes_and_lookup(self):
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(2, 4, 4, 8)), jnp.float32)
    codebook = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)

    def search(probe, z, codebook):
      codes = nearest_codes(probe(z), codebook)
      return codes, lookup_codes(codes, codebook)
    codes, quantized = self.assert_jit_equals_eager(search, z, codebook,
                                                    exact=lambda out: out)
    brute = np.argmin(((np.asarray(z)[..., None, :] - np.asarray(codebook))**2).sum(-1), -1)
    np.testing.assert_array_equal(codes, brute)
    np.testing.assert_array_equal(quantized, np.asarray(codebook)[brute])

  @chex.variants(with_jit=True, without_jit=True)
  def test_training_step_updates_the_ema_codebook(self):
    vq = VectorQuantizerEMA(num_codes=8, code_dim=4, decay=0.9)
    z = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 3, 4)), jnp.float32)
    variables = vq.init(jax.random.PRNGKey(0), z, train=False)

    def step(probe, variables, z):
      out, updates = vq.apply(variables, probe(z), train=True, mutable=["vq_stats"])
      return out, updates
    out, updates = self.assert_jit_equals_eager(step, variables, z,
                                                exact=lambda r: r[0].codes)
    chex.assert_shape(out.quantized, z.shape)
    assert not np.allclose(updates["vq_stats"]["codebook"], variables["vq_stats"]["codebook"])


class CausalLayersVariantsTest(JitEagerTestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_causal_convs_and_attention(self):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 5, 6)), jnp.float32)
    seq = jnp.asarray(np.random.default_rng(3).normal(size=(2, 9, 8)), jnp.float32)
    convs = {mode: causal.CausalConv(4, kernel, mode)
             for mode, kernel in (("down", (2, 3)), ("down_right", (2, 2)))}
    attn = causal.CausalSelfAttention(8, 2)
    params = dict(conv={m: c.init(jax.random.PRNGKey(0), x) for m, c in convs.items()},
                  attn=attn.init(jax.random.PRNGKey(1), seq, seq, train=False))
    changed_x = x.at[:, 1:].set(0.0)     # everything below the first row changed
    changed_seq = seq.at[:, 5].add(1.0)  # position 5 changed

    def layers(probe, params, x, changed_x, seq, changed_seq):
      probe(x)
      conv = {m: (c.apply(params["conv"][m], x), c.apply(params["conv"][m], changed_x))
              for m, c in convs.items()}
      att = [attn.apply(params["attn"], s, s, train=False) for s in (seq, changed_seq)]
      return conv, att
    conv, (out, out2) = self.assert_jit_equals_eager(layers, params, x, changed_x, seq,
                                                     changed_seq)
    chex.assert_shape(conv["down"][0], (2, 5, 5, 4))
    # Causality: the first row of a down conv sees only its own row and padding.
    chex.assert_trees_all_close(conv["down"][1][:, 0], conv["down"][0][:, 0], atol=1e-6)
    # Strictly causal attention: changing position 5 (its query and its key / value)
    # changes no output before it.
    chex.assert_trees_all_close(out2[:, :5], out[:, :5], atol=1e-6)
    assert not np.allclose(out2[:, 6:], out[:, 6:])  # later positions do see it


class VQVAEVariantsTest(JitEagerTestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_forward_codes_loss_and_gradients(self):
    config = load_config("demo", "vqvae,tiny")
    model = builders.build_vqvae(config)
    size = config.data.image_size
    # Real initial codebooks (an eager init of the tiny model), random-normal weights.
    variables = nn.unbox(builders.vqvae_init_fn(model, size)(jax.random.PRNGKey(0)))
    model_state = {k: v for k, v in variables.items() if k != "params"}
    params = state_lib.numpy_params(builders.vqvae_init_fn(model, size))
    images = np.random.default_rng(4).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    loss_fn = losses.vqvae_loss_fn(model, config.vqvae.beta)

    def forward_and_grads(probe, params, model_state, images):
      batch = {"image": probe(jnp.asarray(images))}
      codes = model.apply({"params": params, **model_state},
                          image_lib.to_model(batch["image"]), method=model.encode)
      (loss, (metrics, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, model_state, batch, jax.random.PRNGKey(5))
      return codes, loss, metrics, new_state, grads
    codes, loss, *_ = self.assert_jit_equals_eager(
        forward_and_grads, params, model_state, images, exact=lambda r: r[0])
    assert [c.shape for c in codes] == [(2, size // 8, size // 8), (2, size // 4, size // 4)]
    assert np.isfinite(loss)


class PriorVariantsTest(JitEagerTestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_forward_loss_and_gradients(self):
    """A conditional, class-conditional prior with attention: the logits of the
    teacher-forced pass, the training loss (dropout drawn from one key) and its gradients,
    for the scanned and the unrolled layer stacks.

    The scanned stack trains without gated-layer dropout here: flax's `nn.scan` draws
    other dropout masks under jax.disable_jit than jitted (a scanned nn.Dropout alone
    shows it), so op by op is not the jitted program there; the unrolled stack checks
    that dropout.
    """
    rng = np.random.default_rng(6)
    batch = {"bottom": jnp.asarray(rng.integers(0, 8, (2, 4, 4)), jnp.int32),
             "top": jnp.asarray(rng.integers(0, 8, (2, 2, 2)), jnp.int32),
             "label": jnp.asarray([0, 2], jnp.int32)}
    for scan_layers, dropout in ((True, 0.0), (False, 0.1)):
      prior = PixelSNAILPrior(num_codes=8, hidden=8, res_hidden=8, num_layers=2,
                              attention_every=2, num_heads=2, num_output_layers=1,
                              num_cond_layers=1, num_cond_levels=1, cond_scales=(2,),
                              num_classes=3, dropout=dropout, attn_dropout=0.1,
                              scan_layers=scan_layers)
      params = numpy_params(prior, batch["bottom"], (batch["top"],), batch["label"])
      loss_fn = losses.prior_loss_fn(prior, "bottom", ("top",))

      def forward_and_grads(probe, params, batch):
        logits = prior.apply({"params": params}, probe(batch["bottom"]), (batch["top"],),
                             batch["label"], train=False)
        (loss, (metrics, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, {}, batch, jax.random.PRNGKey(7))
        return logits, loss, metrics, grads
      logits, loss, *_ = self.assert_jit_equals_eager(forward_and_grads, params, batch)
      chex.assert_shape(logits, (2, 4, 4, 8))
      assert np.isfinite(loss)


class SamplerVariantsTest(JitEagerTestCase):

  @staticmethod
  def _prior_and_inputs():
    prior = PixelSNAILPrior(num_codes=6, hidden=8, res_hidden=8, num_layers=1,
                            attention_every=1, num_heads=2, num_classes=2)
    labels = jnp.asarray([0, 1], jnp.int32)
    params = numpy_params(prior, jnp.zeros((2, 3, 3), jnp.int32), (), labels)
    return prior, params, labels

  @chex.variants(with_jit=True, without_jit=True)
  def test_filter_logits_and_draw(self):
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(3, 10)), jnp.float32)

    def filter_and_draw(probe, logits):
      kept = draw_lib.filter_logits(probe(logits), 0.7, top_k=4, top_p=0.8)
      codes = draw_lib.draw(jax.random.PRNGKey(8), 5, logits, 0.7, 4, 0.8, nucleus=True)
      return jnp.where(jnp.isfinite(kept), kept, 0.0), jnp.isfinite(kept), codes
    out, kept, codes = self.assert_jit_equals_eager(filter_and_draw, logits,
                                                    exact=lambda r: r[1:])
    kept = np.asarray(kept)
    assert (kept.sum(-1) <= 4).all() and (kept.sum(-1) >= 1).all()
    chex.assert_trees_all_close(out, jnp.where(kept, logits / 0.7, 0.0), rtol=1e-6)
    assert kept[np.arange(3), np.asarray(codes)].all()  # drawn among the kept codes

  @chex.variants(with_jit=True, without_jit=True)
  def test_greedy_decode_loop_runs_position_by_position(self):
    """run_incremental with an argmax choice: eagerly the loop really runs position by
    position (choose is called with concrete logits once per position), jitted it is
    traced; codes and the logits at every position agree."""
    prior, params, labels = self._prior_and_inputs()
    choices = Probe()

    def decode(probe, params, labels):
      return run_incremental(prior, params, shape=(2, 3, 3), labels=probe(labels),
                             choose=functools.partial(_argmax_choice, choices),
                             return_logits=True)
    got, want = self.variant_and_other(decode, params, labels)
    np.testing.assert_array_equal(got[0], want[0])
    chex.assert_trees_all_close(got[1], want[1], atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(got[0], np.argmax(np.asarray(got[1]), -1))
    # Eagerly one call per position (9) with concrete logits; jitted only tracers.
    assert choices.traced.count(False) == 9, choices.traced

  @chex.variants(with_jit=True, without_jit=True)
  def test_incremental_sampler(self):
    """sample_incremental (its own jitted loop included) with temperature, top-k, top-p."""
    prior, params, labels = self._prior_and_inputs()

    def sample(probe, params, rng):
      return sample_incremental(prior, params, probe(rng), shape=(2, 3, 3), labels=labels,
                                temperature=0.9, top_k=4, top_p=0.9, return_logits=True)
    codes, logits = self.assert_jit_equals_eager(sample, params, jax.random.PRNGKey(5),
                                                 exact=lambda r: r[0])
    chex.assert_shape(codes, (2, 3, 3))
    chex.assert_shape(logits, (2, 3, 3, 6))
    assert int(codes.max()) < 6 and int(codes.min()) >= 0


def _argmax_choice(probe: Probe, p, logits):
  """choose(p, logits [B, K]) -> int32 [B]: the most likely code, logits probed."""
  del p
  return jnp.argmax(probe(logits), -1).astype(jnp.int32)
