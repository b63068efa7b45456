"""The deploy-side command line: ``python -m export`` writes SavedModel + ONNX exports of a
trained run; ``python -m export.predict`` classifies images with an exported ONNX model.

Kept free of imports so that ``export.predict`` needs only onnxruntime, NumPy and Pillow.
"""
