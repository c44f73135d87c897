"""Chunked building blocks for volumes larger than memory (Dask arrays, NumPy or CuPy chunks).

Each function gives exactly the in-memory result whatever the chunking.
"""
from gpu_pipeline.chunked.components import label_chunked
from gpu_pipeline.chunked.histogram import otsu_threshold_chunked

__all__ = ["label_chunked", "otsu_threshold_chunked"]
