"""Image-text retrieval experiments: data, models, training, retrieval and tracking."""

__version__ = "0.1.0"
