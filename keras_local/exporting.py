"""Export a trained LocalModel for deployment: SavedModel + ONNX + metadata, self-checked.

The exported network is the backbone only (``LocalModel.inference_model()``: no heads,
no dropout, BatchNorm on its moving statistics), in float32, with the dataset's
normalisation inside the graph, so consumers feed raw pixels in [0, 255] (float32,
NHWC). Layout of an export directory::

    model.onnx        ONNX (tf2onnx, opset 17), input "pixels" [batch, H, W, C] -> "logits"
    saved_model/      SavedModel, signature "serving_default": pixels -> {"logits"}
    metadata.json     input shape, class names, dataset, config, test error, and the
                      manifest: the sha256 of every file the export wrote ("files")

``overwrite`` replaces only a directory whose contents are exactly what its manifest
lists (empty folders aside): a user's file in it, or an edited export, is never deleted.

Export is TensorFlow-based: it needs the tensorflow Keras backend.
"""

import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import keras
import numpy as np


FORMATS = ("savedmodel", "onnx")
ONNX_FILE = "model.onnx"
SAVED_MODEL_DIR = "saved_model"
METADATA_FILE = "metadata.json"
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
ONNX_OPSET = 17
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The export could not be written or does not reproduce the Keras model."""


class NotReplaceableError(ExportError):
    """``overwrite`` was asked for a folder that is not an unchanged export."""


def export_model(model, out_dir, formats=FORMATS, check_images=None, test_error=None,
                 run_config=None, overwrite=False):
    """Write ``model`` (a trained LocalModel) to ``out_dir`` and check the result.

    Args:
        model: the trained LocalModel.
        out_dir: the export directory to create.
        formats: any of "savedmodel", "onnx".
        check_images: raw pixels (N, H, W, C) or (H, W, C) in [0, 255] for the
            self-check; None uses a deterministic random batch.
        test_error: the model's test error in %, recorded in the metadata if known.
        run_config: the run's config dict for the metadata (default: model.config).
        overwrite: replace an existing ``out_dir`` (only once the new export passed).

    Returns the metadata dict written to ``metadata.json``. Everything is written to a
    temporary directory beside ``out_dir`` and renamed at the end; on any failure
    (including a parity check above 1e-4 or a differing argmax) it is removed and
    ExportError or the original error is raised. The parity reference is the Keras
    model on normalised images; for a mixed-precision model, its float32 rebuild.
    """
    tf = _require_tensorflow()
    formats = _check_formats(formats)
    out_dir = pathlib.Path(out_dir).resolve()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"export directory {out_dir} already exists")
    if out_dir.exists():
        check_replaceable(out_dir)
    images = _check_images(check_images, model.example_shape)

    float_model = _float32_model(model)
    network = deployable_model(float_model)
    # Checks run on the CPU in plain float32: GPUs may use TF32 matmuls (about 1e-3 off).
    with tf.device("/CPU:0"):
        reference = _reference_logits(float_model, images)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out_dir)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.",
                                            suffix=".partial", dir=out_dir.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; an export is an ordinary folder
    try:
        parity = {}
        if "savedmodel" in formats:
            _write_saved_model(tf, network, staging / SAVED_MODEL_DIR)
            parity["savedmodel"] = _check_parity(
                "SavedModel", _saved_model_logits(tf, staging / SAVED_MODEL_DIR, images), reference)
        if "onnx" in formats:
            _write_onnx(tf, network, staging / ONNX_FILE)
            parity["onnx"] = _check_parity(
                "ONNX", _onnx_logits(staging / ONNX_FILE, images), reference)
        metadata = _metadata(model, network, formats, staging, parity, test_error, run_config)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return metadata


def deployable_model(model):
    """A float32 functional Keras model: raw pixels in [0, 255] -> logits.

    The dataset's normalisation ``(x / 255 - mean) / std`` is its first layer (a scale
    and an offset per channel); the rest
    is ``inference_model()`` of ``model`` (rebuilt in float32 for mixed precision).
    """
    model = _float32_model(model)
    preprocessing = _preprocessing(model)
    shape = tuple(model.example_shape)
    if len(preprocessing["mean"]) != shape[-1]:
        raise ValueError(
            f"model input shape {shape} has {shape[-1]} channels but its preprocessing "
            f"normalises {len(preprocessing['mean'])}")
    mean = np.asarray(preprocessing["mean"], dtype="float64")
    std = np.asarray(preprocessing["std"], dtype="float64")
    pixels = keras.Input(shape=shape, name=INPUT_NAME, dtype="float32")
    normalised = keras.layers.Rescaling(
        scale=(1.0 / (255.0 * std)).astype("float32"), offset=(-mean / std).astype("float32"),
        dtype="float32", name="normalise")(pixels)
    backbone = model.inference_model()
    return keras.Model(pixels, backbone(normalised), name=f"{model.architecture}_deploy")


# --------------------------------------------------------------------------- checks
def _require_tensorflow():
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"export needs TensorFlow: set KERAS_BACKEND=tensorflow (backend is {backend!r})")
    try:
        import tensorflow as tf
    except ImportError as error:
        raise RuntimeError(f"export needs TensorFlow, which cannot be imported: {error}") from None
    return tf


def _check_formats(formats):
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown export format(s) {unknown or list(formats)}; "
                         f"choose from {', '.join(FORMATS)}")
    return formats


def _check_images(images, example_shape):
    example_shape = tuple(example_shape)
    if images is None:
        rng = np.random.default_rng(0)
        return rng.uniform(0.0, 255.0, size=(8,) + example_shape).astype("float32")
    images = np.asarray(images, dtype="float32")
    if images.shape == example_shape:
        images = images[None]
    if images.ndim != len(example_shape) + 1 or images.shape[1:] != example_shape \
            or images.shape[0] == 0:
        raise ValueError(f"check_images of shape {images.shape} do not match the model "
                         f"input (N,) + {example_shape}")
    return images


def _preprocessing(model):
    """The normalisation and class names the model was trained with (they travel with
    the model: ``LocalModel.preprocessing``)."""
    if not model.preprocessing:
        raise ValueError(
            "the model has no preprocessing (normalisation, class names): build it with "
            "keras_local.build_model and a config whose dataset matches its input shape, or "
            "pass LocalModel(..., preprocessing={'dataset', 'mean', 'std', 'class_names'})")
    return model.preprocessing


def _normalise(model, images):
    preprocessing = _preprocessing(model)
    mean = np.asarray(preprocessing["mean"], dtype="float32")
    std = np.asarray(preprocessing["std"], dtype="float32")
    return (images / np.float32(255.0) - mean) / std


def _reference_logits(model, images, batch_size=256):
    """The Keras model's logits on ``images`` normalised as in training."""
    normalised = _normalise(model, images)
    chunks = [keras.ops.convert_to_numpy(model(normalised[i:i + batch_size], training=False))
              for i in range(0, len(normalised), batch_size)]
    return np.concatenate(chunks).astype("float32")


def _check_parity(label, logits, reference):
    """Max abs logit difference; raise ExportError above tolerance or on a flipped argmax."""
    if logits.shape != reference.shape:
        raise ExportError(f"{label} output shape {logits.shape} != Keras {reference.shape}")
    diff = float(np.max(np.abs(logits - reference)))
    if not diff < PARITY_TOLERANCE:
        raise ExportError(f"{label} logits differ from Keras by {diff:.3g} "
                          f"(tolerance {PARITY_TOLERANCE:g})")
    # Keras's own top-2 gap below the tolerance is a tie, not a disagreement.
    ranked = np.sort(reference, axis=-1)
    decided = ranked[:, -1] - ranked[:, -2] > PARITY_TOLERANCE
    flipped = (np.argmax(logits, -1) != np.argmax(reference, -1)) & decided
    if flipped.any():
        raise ExportError(f"{label} predicts a different class than Keras for "
                          f"{int(flipped.sum())} of {len(reference)} check images")
    return diff


# --------------------------------------------------------------------------- writing
def _float32_model(model):
    """``model`` itself if float32, else a float32 copy of its backbone weights."""
    if model.config.precision == "float32":
        return model
    from keras_local.models.local_model import LocalModel

    copy = LocalModel(model.architecture, model.example_shape, model.num_classes,
                      model.config.replace(precision="float32"),
                      preprocessing=model.preprocessing)
    for target, source in zip(copy.backbone_variables(), model.backbone_variables()):
        if tuple(target.shape) != tuple(source.shape):
            raise ExportError(f"cannot rebuild in float32: {source.path} has shape "
                              f"{tuple(source.shape)}, float32 copy {tuple(target.shape)}")
        target.assign(keras.ops.cast(source, "float32"))
    return copy


def _serving_function(tf, network):
    spec = tf.TensorSpec((None,) + tuple(network.input_shape[1:]), tf.float32, name=INPUT_NAME)

    @tf.function(input_signature=[spec])
    def serve(pixels):
        return {OUTPUT_NAME: network(pixels, training=False)}

    return serve


def _write_saved_model(tf, network, path):
    archive = keras.export.ExportArchive()
    archive.track(network)
    # The first endpoint is also exported as "serving_default".
    archive.add_endpoint("serve", _serving_function(tf, network))
    archive.write_out(str(path), verbose=False)


def _write_onnx(tf, network, path):
    import onnx
    import tf2onnx

    serve = _serving_function(tf, network)
    proto, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature,
                                             opset=ONNX_OPSET)
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _saved_model_logits(tf, path, images):
    with tf.device("/CPU:0"):
        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        return serve(**{INPUT_NAME: tf.constant(images)})[OUTPUT_NAME].numpy()


def _onnx_logits(path, images):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


def _metadata(model, network, formats, directory, parity, test_error, run_config):
    import tensorflow as tf
    import tf2onnx

    preprocessing = _preprocessing(model)
    class_names = list(preprocessing["class_names"]) or [str(i) for i in range(model.num_classes)]
    if len(class_names) != model.num_classes:
        raise ValueError(f"dataset {preprocessing['dataset']!r} has {len(class_names)} class "
                         f"names but the model has {model.num_classes} outputs")
    return {
        "format_version": 1,
        "architecture": model.architecture,
        "dataset": preprocessing["dataset"],
        "input": {"name": INPUT_NAME, "shape": [None] + list(model.example_shape),
                  "dtype": "float32", "layout": "NHWC", "range": [0, 255]},
        "output": {"name": OUTPUT_NAME, "shape": [None, model.num_classes]},
        "normalisation": {"mean": list(preprocessing["mean"]), "std": list(preprocessing["std"]),
                          "note": "inside the graph: feed raw pixels"},
        "class_names": class_names,
        "parameter_count": int(network.count_params()),
        "test_error": None if test_error is None else float(test_error),
        "config": run_config if run_config is not None else model.config.to_dict(),
        "formats": list(formats),
        "onnx_opset": ONNX_OPSET if "onnx" in formats else None,
        "parity_max_abs_diff": parity,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "tf2onnx": tf2onnx.__version__},
        "files": _file_hashes(directory),
    }


def _file_hashes(directory):
    """The manifest: every file written so far, by relative path, with its sha256."""
    return {path.relative_to(directory).as_posix(): _sha256(path)
            for path in sorted(p for p in directory.rglob("*") if p.is_file())}


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_replaceable(out_dir):
    """NotReplaceableError unless ``out_dir`` is a previous export that can be deleted:
    a folder holding exactly the files its manifest (``metadata.json``'s "files") lists,
    unchanged, and writable. Anything else (a run directory, a folder of the user's that
    happens to hold a metadata.json, an export with files added or edited) is refused."""
    out_dir = pathlib.Path(out_dir)
    refuse = NotReplaceableError
    refusal = f"refusing to replace {out_dir}"
    if not out_dir.is_dir() or not (out_dir / METADATA_FILE).is_file():
        raise refuse(f"{out_dir} is not an export directory (no {METADATA_FILE}): {refusal}")
    manifest = _manifest(out_dir / METADATA_FILE)
    if manifest is None:
        raise refuse(f"{out_dir} is not an export directory (its {METADATA_FILE} lists no "
                     f"files an export wrote): {refusal}")
    found = {}
    for path in sorted(out_dir.rglob("*")):
        if path.is_symlink() or not path.is_dir():
            found[path.relative_to(out_dir).as_posix()] = path
    found.pop(METADATA_FILE)
    others = sorted(set(found) - set(manifest))
    if others:
        listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3
                                          else "")
        raise refuse(f"{out_dir} holds files no export wrote ({listed}): {refusal}")
    for name, expected in manifest.items():
        if name not in found:
            raise refuse(f"{out_dir}: {name} of the export is missing: {refusal}")
        if not found[name].is_file() or _sha256(found[name]) != expected:
            raise refuse(f"{out_dir}: {name} differs from what the export wrote: {refusal}")
    for folder in [out_dir.parent, out_dir] + [p for p in out_dir.rglob("*") if p.is_dir()]:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise refuse(f"cannot replace {out_dir}: {folder} is not writable")


def _manifest(path, max_bytes=1 << 24):
    """The "files" of an export's metadata.json ({relative path: sha256}), or None."""
    try:
        with open(path, "rb") as stream:
            metadata = json.loads(stream.read(max_bytes))
        files = metadata["files"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return None
    if not isinstance(files, dict) or not files or not all(
            isinstance(name, str) and isinstance(digest, str) for name, digest in files.items()):
        return None
    return files


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_staging(out_dir):
    """Remove the staging folders of exports to ``out_dir`` whose process is gone
    (killed before it could clean up); a running export's folder is left alone."""
    for folder in out_dir.parent.glob(f".{out_dir.name}.*.partial"):
        pid = folder.name[len(out_dir.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(staging, out_dir):
    """Rename the finished export to ``out_dir``, replacing an old one only now (checked
    again: files may have been added to it while this export ran)."""
    old = None
    if out_dir.exists():
        check_replaceable(out_dir)
        # A fresh empty folder's name, which the old export is renamed over.
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old",
                                            dir=out_dir.parent))
        try:
            os.rename(out_dir, old)
        except OSError:
            old.rmdir()
            raise
    try:
        os.rename(staging, out_dir)
    except OSError:
        if old is not None:
            os.rename(old, out_dir)  # the previous export stays where it was
        raise
    if old is not None:
        try:
            shutil.rmtree(old)
        except OSError as error:
            raise ExportError(f"exported to {out_dir}, but the previous export could not be "
                              f"removed from {old}: {error}") from None
