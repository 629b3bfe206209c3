"""Evaluation library, one module per job, all on built models (no configs, no workdirs).

Feature networks: feature_networks (registry, batched extraction), inception, vgg,
efficientnet, convert / torch_pickle (PyTorch weights to Flax, without torch).
Metrics: metrics (FID, IS, precision/recall, moments). Evaluators: table1 (NLL / MSE over
reconstruction and likelihood), distances (FID / IS / FID* / precision-recall of image
sets), cas (Classification Accuracy Score), tradeoff (rejection-sampling candidates and
selection), validation_pass; report writes report.json / report.md / tradeoff.png.
The project's classifier: classifier (model), classifier_training (task, accuracy).
"""
