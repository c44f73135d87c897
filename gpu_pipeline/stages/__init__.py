"""The pipeline's stages, each written once against the array module (NumPy or CuPy)."""
