"""Serving: export graph, SavedModel / ONNX / TFLite writers, predict, model card."""
