"""Evaluation: feature networks (FID Inception-v3, VGG-16, EfficientNet-Lite0),
PyTorch weight converters, batched feature extraction and sample-quality metrics
(FID, Inception Score, improved precision/recall), plus a small classifier for
rejection sampling and the Classification Accuracy Score."""
