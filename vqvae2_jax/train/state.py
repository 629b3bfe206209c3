"""The train state every stage shares, its optimizer and its initialisation by shape."""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from vqvae2_jax import parallel


# XLA options for programs that run once (initialisation).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position.

  step: int32 scalar. params: the optimised parameters (unboxed).
  opt_state: the optax state. model_state: non-trained collections, e.g. {'vq_stats': ...}
  (EMA codebooks). ema_params: exponential moving average of params ({} when disabled).
  rng: uint32 [2] base key; step keys are fold_in(rng, step).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any
  ema_params: Any
  rng: jax.Array


def make_optimizer(train_config) -> optax.GradientTransformation:
  """Adam(W) with optional linear warm-up and global-norm clipping."""
  lr = train_config.learning_rate
  if train_config.warmup_steps > 0:
    lr = optax.linear_schedule(0.0, lr, train_config.warmup_steps)
  steps = []
  if train_config.grad_clip_norm > 0:
    steps.append(optax.clip_by_global_norm(train_config.grad_clip_norm))
  steps.append(optax.adamw(lr, weight_decay=train_config.weight_decay)
               if train_config.weight_decay > 0 else optax.adam(lr))
  return optax.chain(*steps)


def plan_state(init_variables: Callable[[jax.Array], dict], tx, use_param_ema: bool
               ) -> tuple[Callable[[jax.Array], TrainState], Any, Any]:
  """Plans a TrainState by shape only (nothing is allocated).

  init_variables(rng) returns Flax variables {'params': ..., other collections}, params
  possibly boxed with logical axis names. Returns (make_state, abstract_state, shardings)
  where make_state(rng) builds the state and shardings place it on the ambient mesh
  (`parallel.use_mesh`) under the ambient logical axis rules.
  """
  def make_state(key):
    init_key, state_key = jax.random.split(key)
    variables = init_variables(init_key)
    params = parallel.unboxed(variables["params"])
    model_state = parallel.unboxed({k: v for k, v in variables.items() if k != "params"})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), model_state=model_state,
                      ema_params=params if use_param_ema else {}, rng=state_key)

  # Shardings come from the logical names of the *boxed* params; optimizer moments have
  # the same structure, so each inherits its parameter's sharding.
  # Nothing here may be computed eagerly: it would run on the ambient mesh's devices, which
  # for an ahead-of-time TPU plan on a CPU host are topology devices that hold no data.
  key = jax.eval_shape(jax.random.PRNGKey, 0)
  boxed = jax.eval_shape(init_variables, key)
  param_shardings = parallel.logical_shardings(boxed["params"])
  replicated = parallel.replicated()
  abstract = jax.eval_shape(make_state, key)
  with jax.set_mesh(None):  # optax finds the state's structure by an eager init: same
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract.opt_state, param_shardings,
        transform_non_params=lambda _: replicated)
  shardings = TrainState(
      step=replicated, params=param_shardings, opt_state=opt_shardings,
      model_state=jax.tree.map(lambda _: replicated, abstract.model_state),
      ema_params=param_shardings if use_param_ema else {}, rng=replicated)
  return make_state, abstract, shardings


def init_sharded_state(init_variables: Callable[[jax.Array], dict], tx, rng: jax.Array,
                       use_param_ema: bool) -> tuple[TrainState, Any]:
  """Initialises a TrainState directly into its shardings (no host-side full copy)."""
  make_state, _, shardings = plan_state(init_variables, tx, use_param_ema)
  # Initialisation runs once: compiling it without backend optimisation is ~10x faster
  # on CPU (threefry-heavy programs) and costs nothing that matters.
  compiled = jax.jit(make_state, out_shardings=shardings).lower(rng).compile(
      compiler_options=FAST_COMPILE)
  return compiled(rng), shardings


def numpy_params(init_fn: Callable[[jax.Array], dict], seed: int = 0) -> Any:
  """Float32 'params' with init_fn's shapes, drawn from N(0, 1/fan_in) with NumPy.

  For benchmarks and tests: no PRNG kernel is compiled (threefry initialisers of large
  models take minutes to compile on a CPU), and timing or equivalence checks do not
  depend on the values. init_fn(rng) -> Flax variables (possibly boxed).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  shapes = parallel.unboxed(jax.eval_shape(init_fn, jax.random.PRNGKey(0)))["params"]
  rng = np.random.default_rng(seed)

  def fill(s):
    fan_in = max(1, int(np.prod(s.shape[:-1])))
    return jnp.asarray(rng.standard_normal(s.shape, dtype=np.float32) / np.sqrt(fan_in),
                       s.dtype)
  return jax.tree.map(fill, shapes)


def abstract_with_shardings(state_like: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings, the restore target for orbax."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state_like, shardings)
