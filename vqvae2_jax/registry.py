"""The names the package shares, each spelled once: stages, levels and option values.

Plain Python (no jax): config files, the command line, the stages and the library all
import it. The model's own names (levels, upsample modes, remat modes, architectures)
live in `models/names.py`, since models/ imports nothing outside models/, and are
re-exported here so every other module reads them from one place.
"""
from __future__ import annotations

from vqvae2_jax.models.names import (  # re-exported  # pylint: disable=unused-import
    ARCHITECTURES, LEVEL_NAMES, PAPER, PUBLIC, REMAT_BLOCK, REMAT_MODES, REMAT_NONE,
    UPSAMPLE_MODES, UPSAMPLE_RESIZE, UPSAMPLE_SUBPIXEL, UPSAMPLE_TRANSPOSE, level_names)

# ------------------------------------------------------------------- stages
# Each stage writes one folder of the workdir, named as the stage (see workdir.py).
VQVAE, EXTRACT, CLASSIFIER, SAMPLE, EVALUATE = ("vqvae", "extract", "classifier", "sample",
                                                "evaluate")
PIPELINE = "pipeline"  # every stage in order (runner.pipeline_stages); no folder of its own
PRIOR_PREFIX = "prior_"  # 'prior_<level>': the stage training one level's prior


def prior_stage(level: str) -> str:
  """'top' -> 'prior_top': the stage (and folder) of a level's prior."""
  return PRIOR_PREFIX + level


def prior_level(stage: str) -> str | None:
  """'prior_top' -> 'top'; None for a stage that trains no prior."""
  return stage[len(PRIOR_PREFIX):] if stage.startswith(PRIOR_PREFIX) else None


# The prior stages the command line accepts: one per level of the deepest named hierarchy.
PRIOR_STAGES = tuple(prior_stage(l) for l in LEVEL_NAMES[max(LEVEL_NAMES)])
STAGES = (VQVAE, EXTRACT, *PRIOR_STAGES, CLASSIFIER, SAMPLE, EVALUATE, PIPELINE)

# ------------------------------------------------------------------- mesh
# The device mesh's axes (config.mesh.data, config.mesh.fsdp): the batch is split over
# both, parameters and optimizer state over 'fsdp' (parallel.py, config.axis_rules).
DATA_AXIS, FSDP_AXIS = "data", "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)

# --------------------------------------------------------------------- data
TRAIN, VAL = "train", "val"
SPLITS = (TRAIN, VAL)
SOURCE_DEMO, SOURCE_FOLDER, SOURCE_TFDS = "demo", "folder", "tfds"  # data/sources.py
DATA_SOURCES = (SOURCE_DEMO, SOURCE_FOLDER, SOURCE_TFDS)
# A corrupt image fails the run, or is skipped and counted (data/errors.BadImagePolicy).
BAD_IMAGE_ERROR, BAD_IMAGE_SKIP = "error", "skip"
ON_BAD_IMAGE = (BAD_IMAGE_ERROR, BAD_IMAGE_SKIP)
DTYPES = ("float32", "bfloat16", "float16")  # compute dtypes of the training stages

# ----------------------------------------------------------------- sampling
INCREMENTAL, REFERENCE = "incremental", "reference"
SAMPLERS = (INCREMENTAL, REFERENCE)  # cached one-position steps | whole-map reference
# Rejection sampling's classifier: none, the classifier stage's, or ImageNet EfficientNet.
REJECT_NONE, REJECT_TRAINED, EFFICIENTNET_LITE0 = "none", "trained", "efficientnet_lite0"
REJECTION_KINDS = (REJECT_NONE, REJECT_TRAINED, EFFICIENTNET_LITE0)

# ----------------------------------------------------------------- evaluate
# How FID's matrix square root is taken (eval/metrics.frechet_distance): the same value;
# eigh is fast, sqrtm is pytorch-fid's computation.
FID_EIGH, FID_SQRTM = "eigh", "sqrtm"
FID_METHODS = (FID_EIGH, FID_SQRTM)
# The network standing in for missing Inception / VGG-16 weights, or none.
FALLBACK_NONE = "none"
FALLBACK_NETWORKS = (EFFICIENTNET_LITE0, FALLBACK_NONE)
# The evaluate stage's settings (config.evaluate; eval/options.EvalOptions reads them).
# Described where the config declares them (config_lib.base_config).
EVALUATE_DEFAULTS = dict(
    num_images=512, batch_size=32, inception_weights="", vgg16_weights="",
    efficientnet_weights="", fallback_network=EFFICIENTNET_LITE0,
    keep_fractions=(1.0, 0.5, 0.25), rejection_classifier="", seed=1,
    max_real_images=0, mse_max_images=10_000, nll_max_batches=0,
    pr_max_images=10_000, pr_k=3, is_splits=10, cas=True, fid_method=FID_EIGH,
    rate_distortion_images=0, cas_per_point=False, guidance_scales=(1.0,))
