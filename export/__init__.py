"""Repository shims of the deploy-side console scripts: ``python -m export`` runs
``keras-local-export`` (SavedModel + ONNX exports of a trained run) and ``python -m
export.predict`` runs ``keras-local-predict`` (classify images with an exported ONNX
model). This folder is not installed; the console scripts are.
"""
