"""Evaluation library, one module per job, on built models.

Feature networks: feature_networks (registry, batched extraction), inception, vgg,
efficientnet, convert / torch_pickle (PyTorch weights to Flax, without torch).
Metrics: metrics (FID, IS, precision/recall, moments). Building blocks: table1 (NLL / MSE
over reconstruction and likelihood), distances (FID / IS / FID* / precision-recall of
image sets), cas (Classification Accuracy Score), tradeoff (rejection-sampling
candidates and selection), rate_distortion (codec vs JPEG / WebP), validation_pass;
report writes report.json / report.md / tradeoff.png.
Evaluators: evaluators/ (one per metric family, over a loaded run's memoised shared
inputs; what the evaluate stage runs).
The project's classifier: classifier (model), classifier_training (task, accuracy).
"""
