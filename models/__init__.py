"""Models: keras + keras.ops only (runs on TF and JAX). Never imports input_pipeline/."""

from models.registry import build_model, list_models, register

__all__ = ["build_model", "list_models", "register"]
