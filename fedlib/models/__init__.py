"""Anomaly models: feature schema, model kinds (autoencoder, Gaussian), ONNX export and
scoring, evaluation metrics, local training from a package. Used by the device and
the server alike; may import ``wire`` only.
"""
