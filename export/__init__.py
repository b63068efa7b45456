"""The deploy-side command line kept in the repository: ``python -m export`` writes
SavedModel + ONNX exports of a trained run; ``python -m export.predict`` classifies images
with an exported ONNX model. Both are thin entry points to ``keras_local.cli``; this folder
is not installed (the console scripts are ``keras-local-export`` / ``keras-local-predict``).
"""
