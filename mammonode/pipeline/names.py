"""Model names, importable without loading PyTorch (the CLI and config use them)."""

MODEL_NAMES = ("image_only", "image_heatmaps", "density_histogram", "density_cnn")
ALL_MODELS = ("patch", *MODEL_NAMES)
