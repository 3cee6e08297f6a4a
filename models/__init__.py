"""Model runners and weights: RetinaFace on onnxruntime, weight resolution, per-process caches."""
