"""How far keras-local's float32 training steps are from exact arithmetic, next to how far
the authors' own float32 run is.

    python benchmarks/exactness.py --reference W            # vgg8b predsim, 5 steps
    python benchmarks/exactness.py --reference W --model mlp --steps 1

Both implementations start from the same weights (keras-local's initialisation, copied
into the authors' model) and train on the same Fashion-MNIST batches (the first
``steps`` x 128 training images in file order, normalised, no augmentation), dropout 0,
each with its own optimiser and BatchNorm. The authors' script run in float64 (under
``torch.set_default_dtype(torch.float64)``) from the same start is the rounding-free
truth. Printed: the share of trainable weights that end more than 1% of the learning
rate away from it, for keras-local and for the authors' float32 run, and the tensors
with the largest shares.

W: the authors' script set up as in docs/benchmarks.md section 1 (train.py, the
torchvision stand-in, venv/ with torch); ``reference_steps.py`` runs there.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_reference_argument, check_reference  # noqa: E402

DATA_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.286, 0.353  # Fashion-MNIST normalisation of the method
RECIPES = {
    "vgg8b": ["--model", "vgg8b", "--dim-in-decoder", "1024", "--num-layers", "1",
              "--num-hidden", "1024"],
    "mlp": ["--model", "mlp", "--num-layers", "3", "--num-hidden", "1024"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_reference_argument(p)
    p.add_argument("--python", default=None,
                   help="python with torch for the reference (default: REFERENCE/venv/bin/python)")
    p.add_argument("--model", default="vgg8b", choices=sorted(RECIPES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--data-dir", default=DATA_DIR)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    check_reference(p, args.reference, "train.py")
    args.python = args.python or os.path.join(args.reference, "venv", "bin", "python")
    if not os.path.isfile(args.python):
        p.error(f"--python {args.python!r}: not a file")
    if args.steps < 1:
        p.error(f"--steps {args.steps}: must be at least 1")
    return args


def load_batches(data_dir, count):
    from keras_local.data.idx import read_idx

    images = read_idx(os.path.join(data_dir, "train-images-idx3-ubyte.gz"), limit=count)
    labels = read_idx(os.path.join(data_dir, "train-labels-idx1-ubyte.gz"), limit=count)
    x = ((images.astype(np.float32) / 255.0 - MEAN) / STD)[..., None]  # NHWC
    return x.astype(np.float32), labels.astype(np.int32)


def weight_map(model):
    """[(keras path, torch name, to_torch, from_torch)] for every weight of a LocalModel
    built from VGG_CHANNELS or mlp, in the authors' module names and layouts."""
    import keras

    from keras_local.layers.block import LocalBlock
    from keras_local.models.vgg import VGG_CHANNELS

    conv_index = [i for i, item in enumerate(VGG_CHANNELS.get(model.architecture, []))
                  if item != "M"]
    entries = []
    shape = (None,) + model.example_shape
    dense_count = conv_count = 0
    flatten_shape = None

    def same(a):
        return a

    def transposed(a):
        return a.T

    def conv_to(a):
        return a.transpose(3, 2, 0, 1)

    def conv_from(a):
        return a.transpose(2, 3, 1, 0)

    def flat_to(height, width, channels):  # NHWC flatten rows -> (out, NCHW flatten)
        return lambda a: a.reshape(height, width, channels, -1).transpose(3, 2, 0, 1).reshape(
            a.shape[-1], -1)

    def flat_from(height, width, channels):
        return lambda a: a.reshape(-1, channels, height, width).transpose(2, 3, 1, 0).reshape(
            height * width * channels, -1)

    for layer in model.feature_layers:
        if isinstance(layer, keras.layers.Flatten):
            flatten_shape = shape[1:]
        if isinstance(layer, LocalBlock):
            if layer.kind == "conv":
                prefix = f"features.{conv_index[conv_count]}."
                conv_count += 1
            else:
                prefix = ("classifier." if conv_index else "") + f"layers.{dense_count}."
                dense_count += 1
            name = layer.name
            out_shape = layer.compute_output_shape(shape)
            if layer.kind == "conv":
                encoder = (conv_to, conv_from)
            elif flatten_shape is not None and len(flatten_shape) == 3 and dense_count == 1:
                encoder = (flat_to(*flatten_shape), flat_from(*flatten_shape))
            else:
                encoder = (transposed, transposed)
            pairs = [("encoder/kernel", "encoder.weight", *encoder),
                     ("encoder/bias", "encoder.bias", same, same),
                     ("bn/gamma", "bn.weight", same, same), ("bn/beta", "bn.bias", same, same),
                     ("bn/moving_mean", "bn.running_mean", same, same),
                     ("bn/moving_variance", "bn.running_var", same, same)]
            if layer.kind == "conv":
                pooled = layer.heads["pred"].pool.compute_output_shape(out_shape)
                pred = (flat_to(*pooled[1:]), flat_from(*pooled[1:]))
                pairs.append(("sim_head/conv/kernel", "conv_loss.weight", conv_to, conv_from))
            else:
                pred = (transposed, transposed)
                pairs.append(("sim_head/dense/kernel", "linear_loss.weight", transposed,
                              transposed))
            pairs += [("pred_head/dense/kernel", "decoder_y.weight", *pred),
                      ("pred_head/dense/bias", "decoder_y.bias", same, same)]
            entries += [(f"{name}/{name}_{k}", prefix + t, to, back) for k, t, to, back in pairs]
        shape = layer.compute_output_shape(shape)
    out = "classifier.layer_out." if conv_index else "layer_out."
    entries += [("output/kernel", out + "weight", transposed, transposed),
                ("output/bias", out + "bias", same, same)]
    return entries


def keras_weights(model):
    import keras

    return {v.path.split("/", 1)[1]: keras.ops.convert_to_numpy(v) for v in model.weights}


def run_reference(args, start, x, y, dtype, flags):
    with tempfile.TemporaryDirectory() as folder:
        given, result = os.path.join(folder, "in.npz"), os.path.join(folder, "out.npz")
        np.savez(given, x=x.transpose(0, 3, 1, 2), y=y, batch_size=args.batch_size, lr=args.lr,
                 **{f"w:{name}": value for name, value in start.items()})
        harness = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_steps.py")
        done = subprocess.run([args.python, "-u", harness, given, result, dtype, *flags],
                              cwd=args.reference, capture_output=True, text=True)
        if done.returncode != 0 or "STEPS_DONE" not in done.stdout:
            sys.exit(f"reference run ({dtype}) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        with np.load(result) as data:
            return {name: data[name] for name in data.files}


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras_local as kl

    x, y = load_batches(args.data_dir, args.steps * args.batch_size)
    config = kl.Config(model=args.model, dataset="fashion_mnist", nonlin="leakyrelu",
                       dropout=0.0, lr=args.lr, batch_size=args.batch_size,
                       dim_in_decoder=1024, num_layers=1 if args.model != "mlp" else 3,
                       num_hidden=1024)
    model = kl.build_model(args.model, x.shape[1:], 10, config)
    model.compile()
    entries = weight_map(model)
    start = keras_weights(model)
    start_torch = {name: to(start[path]) for path, name, to, _ in entries}
    flags = RECIPES[args.model] + [
        "--dataset", "FashionMNIST", "--nonlin", "leakyrelu", "--dropout", "0",
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--loss-sup", "predsim",
        "--no-cuda", "--save-dir", ""]
    for i in range(0, len(x), args.batch_size):
        model.train_on_batch(x[i:i + args.batch_size], y[i:i + args.batch_size])
    ours = keras_weights(model)
    exact = run_reference(args, start_torch, x, y, "float64", flags)
    theirs = run_reference(args, start_torch, x, y, "float32", flags)

    trainable = {v.path.split("/", 1)[1] for v in model.trainable_variables}
    threshold = 0.01 * args.lr
    report = {"model": args.model, "steps": args.steps, "lr": args.lr, "tensors": {}}
    totals = {"keras_local": [0, 0], "authors_float32": [0, 0]}
    for path, name, _, back in entries:
        if path not in trainable:
            continue
        truth = back(exact[name])
        row = {}
        for side, value in (("keras_local", ours[path]), ("authors_float32", back(theirs[name]))):
            off = int(np.sum(np.abs(value.astype(np.float64) - truth) > threshold))
            totals[side][0] += off
            totals[side][1] += truth.size
            row[side] = off / truth.size
        report["tensors"][path] = row
    for side, (off, size) in totals.items():
        report[f"{side}_share_off"] = off / size
    print(f"{args.model} predsim, {args.steps} steps of {args.batch_size} Fashion-MNIST images, "
          f"lr {args.lr}: share of trainable weights more than 1% of lr away from the "
          f"authors' float64 run")
    print(f"  keras-local float32:      {100 * report['keras_local_share_off']:.3f}%")
    print(f"  authors' script float32:  {100 * report['authors_float32_share_off']:.3f}%")
    worst = sorted(report["tensors"].items(), key=lambda item: -item[1]["keras_local"])[:6]
    print("  largest keras-local shares (keras-local / authors' float32):")
    for path, row in worst:
        print(f"    {path}: {100 * row['keras_local']:.2f}% / {100 * row['authors_float32']:.2f}%")
    if args.json:
        partial = args.json + ".partial"
        with open(partial, "w") as handle:
            json.dump(report, handle, indent=1)
        os.replace(partial, args.json)
    return report


if __name__ == "__main__":
    main()
