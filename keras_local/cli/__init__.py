"""The command lines, installed as console scripts: ``keras-local-train`` (``train.py``),
``keras-local-export`` (``python -m export``) and ``keras-local-predict``
(``python -m export.predict``). The repository's ``train.py`` and ``export/`` are thin
entry points to these modules. Nothing is imported here, so that ``predict`` needs only
onnxruntime, NumPy and Pillow."""
