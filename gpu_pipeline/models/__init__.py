"""Shipped pixel-classifier models (``.npz`` files, package data), loaded by name with
:func:`gpu_pipeline.classifier.load_classifier` (e.g. ``"em-particles"``)."""
