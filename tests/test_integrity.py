"""Array checksums: independent of the sharding, sensitive to every element and position."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vqvae2_jax import integrity


def _tree(x):
  return {"x": x, "step": jnp.int32(7), "mask": jnp.asarray(np.arange(5) % 2 == 0),
          "half": jnp.asarray(np.linspace(-1, 1, 6), jnp.bfloat16)}


def test_checksums_do_not_depend_on_the_sharding():
  x = np.random.default_rng(0).standard_normal((8, 6, 4), dtype=np.float32)
  want = integrity.tree_checksums(_tree(x))  # host arrays
  mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
  for spec in (P("a", "b"), P(None, "b", None), P("b"), P(None, None, "a"), P()):
    got = integrity.tree_checksums(_tree(jax.device_put(x, NamedSharding(mesh, spec))))
    assert got == want, spec
  one = integrity.tree_checksums(_tree(jax.device_put(x, jax.devices()[0])))
  assert one == want


@pytest.mark.parametrize("change", ["last_bit", "swap", "reshape"])
def test_checksums_see_any_change(change):
  x = np.random.default_rng(1).standard_normal((4, 5), dtype=np.float32)
  y = x.copy()
  if change == "last_bit":
    y[2, 3] = np.nextafter(y[2, 3], np.inf)
  elif change == "swap":  # same values, other positions
    y[0, 0], y[3, 4] = x[3, 4], x[0, 0]
  else:
    y = y.reshape(5, 4)
  recorded = integrity.tree_checksums({"x": x})
  if change == "reshape":  # a reshape keeps flat positions: the shape check catches it
    assert integrity.mismatched(recorded, {"x": y}) == []
  else:
    assert integrity.mismatched(recorded, {"x": y}) == ["x"]
