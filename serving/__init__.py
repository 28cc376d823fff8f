"""Serving: export graph, SavedModel / ONNX / TFLite writers, predict, model card.

For notebooks: `Predictor.load(path).predict(paths_or_arrays)` -> pandas DataFrame.
"""

from serving.predicting import Predictor

__all__ = ["Predictor"]
