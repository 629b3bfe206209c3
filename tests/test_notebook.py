"""The demo notebook runs top to bottom (tiny preset, fresh workdir) without an error."""
import json
import os
import sys

import pytest

from helpers import ROOT

nbclient = pytest.importorskip(
    "nbclient", reason="nbclient is not installed: pip install -e '.[test]' to run the notebook")
nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed")
pytest.importorskip("ipykernel", reason="ipykernel is not installed")

NOTEBOOK = os.path.join(ROOT, "notebooks", "vqvae2_demo.ipynb")
KERNEL_NAME = "vqvae2-jax-test"


def _register_kernel(directory) -> str:
  """A kernel spec running this interpreter, under `directory`/kernels (for JUPYTER_PATH).

  The kernel must be this test's Python (the one with the package installed), whatever
  kernels the machine has registered.
  """
  spec_dir = directory / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "vqvae2_jax test", "language": "python"}
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  return str(directory)


def test_notebook_has_no_stored_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"cell {i} holds outputs"


def test_notebook_runs_tiny(tmp_path, monkeypatch):
  jupyter_dir = _register_kernel(tmp_path / "jupyter")
  workdir = tmp_path / "workdir"
  monkeypatch.setenv("JUPYTER_PATH", jupyter_dir)
  monkeypatch.setenv("VQVAE2_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("VQVAE2_NOTEBOOK_WORKDIR", str(workdir))
  # Kernel connection files and IPython's profile stay out of the home folder.
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  monkeypatch.delenv("VQVAE2_REPO", raising=False)  # the notebook finds the checkout itself
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      nb, kernel_name=KERNEL_NAME, timeout=300, allow_errors=False,
      resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"a notebook cell failed:\n{e}")
  # Every picture the notebook shows was written and displayed.
  for rel in ("vqvae/curves.png", "vqvae/codebook_usage.png", "vqvae/level_subsets.png",
              "prior_top/curves.png", "prior_bottom/curves.png", "classifier/curves.png",
              "sample/samples.png", "sample/rejection.png", "bits_per_image.png"):
    assert (workdir / rel).is_file(), rel
  shown = sum(1 for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if "image/png" in out.get("data", {}))
  assert shown == 10, f"{shown} images displayed"
