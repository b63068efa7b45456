"""keras-local-predict MODEL.onnx INPUT... [--top-k 3]

Classifies PNG/JPEG images (converted to the model's channels and resized to its input
size) or ``.npy`` batches of raw pixels (N, H, W, C) or (H, W, C) in [0, 255] with an
ONNX model written by ``keras-local-export``; reads ``metadata.json`` beside the model.
Prints one line per input: the top-k classes with their probabilities. Bad input: one
line on stderr, exit code 2. The model's sha256 must match the one ``metadata.json`` lists
(``--no-verify`` skips the check).

Needs only onnxruntime, NumPy and Pillow (no TensorFlow).
"""

import argparse
import hashlib
import pathlib
import sys
import warnings

import numpy as np
import onnxruntime
from PIL import Image

from keras_local.cli import EXIT_BAD_INPUT, EXPORT_COMMAND, PREDICT_COMMAND, OneLineParser
from keras_local.data.folders import printable
from keras_local.run.json_files import JSONFileError, read_json_file

IMAGE_FORMATS = ("PNG", "JPEG")
IMAGE_MODES = {1: "L", 3: "RGB"}
METADATA_FILE = "metadata.json"


class BadInput(Exception):
    """A model, image or array that cannot be used."""


def load_model(model_path, verify=True):
    """(onnxruntime session, metadata dict) for an exported model file; ``verify``: its
    sha256 must be the one ``metadata.json`` lists (checked before the model is parsed)."""
    model_path = pathlib.Path(model_path)
    _check_file(model_path, "model file")
    metadata_path = model_path.parent / METADATA_FILE
    if not metadata_path.is_file():
        raise BadInput(f"no {METADATA_FILE} beside {model_path}: export the model with "
                       f"{EXPORT_COMMAND}")
    try:
        metadata = read_json_file(metadata_path)
        shape = tuple(int(d) for d in metadata["input"]["shape"][1:])
        class_names = [str(name) for name in metadata["class_names"]]
        expected_hash = metadata.get("files", {}).get(model_path.name)
    except JSONFileError as error:
        raise BadInput(str(error)) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise BadInput(f"{metadata_path}: not an export metadata file ({error!r})") from None
    if verify:
        verify_file(model_path, expected_hash, metadata_path)
    try:
        session = onnxruntime.InferenceSession(str(model_path),
                                               providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        raise BadInput(f"cannot load ONNX model {model_path}: "
                       f"{str(error).strip().splitlines()[0][:300]}") from None
    model_shape = tuple(session.get_inputs()[0].shape[1:])
    if len(model_shape) != len(shape) or any(
            isinstance(d, int) and d != m for d, m in zip(model_shape, shape)):
        raise BadInput(f"{metadata_path}: input shape {list(shape)} disagrees with the "
                       f"model's {list(model_shape)}")
    num_outputs = session.get_outputs()[0].shape[-1]
    if num_outputs != len(class_names):
        raise BadInput(f"{metadata_path}: {len(class_names)} class names for a model with "
                       f"{num_outputs} outputs")
    return session, {"input_shape": shape, "class_names": class_names}


def verify_file(path, expected_hash, metadata_path):
    """BadInput unless the sha256 of ``path`` is ``expected_hash``."""
    if not isinstance(expected_hash, str):
        raise BadInput(f"{metadata_path} lists no sha256 for {path.name}: cannot verify it "
                       f"(pass --no-verify to use it anyway)")
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected_hash:
        raise BadInput(f"{path}: sha256 {digest.hexdigest()[:16]}... differs from "
                       f"{expected_hash[:16]}... listed in {metadata_path}: the file is "
                       f"damaged or was changed (pass --no-verify to use it anyway)")


def read_image(path, input_shape):
    """A PNG/JPEG file as raw pixels of ``input_shape`` (H, W, C), float32."""
    height, width, channels = input_shape
    if channels not in IMAGE_MODES:
        raise BadInput(f"{path}: images need a model with 1 or 3 channels, not {channels}")
    # Pillow warns above Image.MAX_IMAGE_PIXELS (a decompression-bomb guard): refuse instead.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=IMAGE_FORMATS) as image:
                image = image.convert(IMAGE_MODES[channels])
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadInput(f"{path}: image larger than {Image.MAX_IMAGE_PIXELS:,} pixels") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise BadInput(f"{path}: cannot decode as PNG or JPEG ({error})") from None
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype="float32").reshape(input_shape)


def read_array(path, input_shape):
    """A .npy file of raw pixels as a float32 batch (N,) + ``input_shape``."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise BadInput(f"{path}: not a readable .npy array ({error})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "uif":
        raise BadInput(f"{path}: expected a numeric array, got dtype "
                       f"{getattr(array, 'dtype', type(array).__name__)}")
    if array.shape == tuple(input_shape):
        array = array[None]
    if array.ndim != 4 or array.shape[1:] != tuple(input_shape) or array.shape[0] == 0:
        raise BadInput(f"{path}: array of shape {array.shape} does not match the model input "
                       f"(N, {', '.join(map(str, input_shape))}) or "
                       f"({', '.join(map(str, input_shape))})")
    batch = np.asarray(array, dtype="float32")
    if not np.isfinite(batch).all():
        raise BadInput(f"{path}: array contains NaN or infinite values")
    if batch.min() < 0 or batch.max() > 255:
        raise BadInput(f"{path}: pixel values span [{batch.min():g}, {batch.max():g}]; raw "
                       f"pixels must lie in [0, 255] (the model normalises them itself)")
    return batch


def load_inputs(paths, input_shape):
    """[(label, raw pixels (H, W, C))] for every image and every row of every .npy file."""
    examples = []
    for path in paths:
        path = pathlib.Path(path)
        _check_file(path, "input file")
        if path.suffix.lower() == ".npy":
            batch = read_array(path, input_shape)
            examples += [(f"{path}[{i}]", image) for i, image in enumerate(batch)]
        else:
            examples.append((str(path), read_image(path, input_shape)))
    return examples


def _check_file(path, what):
    """BadInput unless ``path`` is a file (a directory or a missing path: one line)."""
    if path.is_dir():
        raise BadInput(f"{what} {path} is a directory")
    if not path.is_file():
        raise BadInput(f"{what} {path} not found")


def softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def classify(session, images, batch_size=256):
    """Class probabilities (N, K) for raw-pixel images (N, H, W, C)."""
    name = session.get_inputs()[0].name
    logits = [session.run(None, {name: images[i:i + batch_size]})[0]
              for i in range(0, len(images), batch_size)]
    return softmax(np.concatenate(logits).astype("float64"))


def top_k(probabilities, class_names, k):
    """[(class name, probability)] of the k most probable classes, best first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(class_names[i], float(probabilities[i])) for i in order]


def parse_args(argv):
    parser = OneLineParser(
        prog=PREDICT_COMMAND,
        description="Classify PNG/JPEG images or .npy batches with an exported ONNX model.")
    parser.add_argument("model", help=f"model.onnx written by {EXPORT_COMMAND}")
    parser.add_argument("inputs", nargs="+", help="PNG/JPEG files or .npy arrays of raw pixels")
    parser.add_argument("--top-k", type=_positive_int, default=3,
                        help="classes to print per input (default 3)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the sha256 check of the model against metadata.json")
    return parser.parse_args(argv)


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv=None):
    args = parse_args(argv)
    try:
        session, metadata = load_model(args.model, verify=not args.no_verify)
        examples = load_inputs(args.inputs, metadata["input_shape"])
    except BadInput as error:
        print(f"{PREDICT_COMMAND}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    probabilities = classify(session, np.stack([image for _, image in examples]))
    for (label, _), row in zip(examples, probabilities):
        ranked = top_k(row, metadata["class_names"], args.top_k)
        # class names are folder names: control characters are shown, not interpreted
        print(f"{printable(label)}: " + ", ".join(f"{printable(name)} {p:.3f}"
                                                   for name, p in ranked))
    return 0


if __name__ == "__main__":
    sys.exit(main())
