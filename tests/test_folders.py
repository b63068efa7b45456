"""--dataset folder: a generated 3-class image folder trains, exports, and
``python -m export.predict`` names the folder's classes; bad folders fail in one line."""

import os

import numpy as np
import pytest
from PIL import Image

import keras_local as kl
from keras_local.data.catalogue import dataset_info
from keras_local.data.folders import describe_folder, load_folder, make_folder_datasets

from helpers import read_json, train_main

CLASSES = ("apple", "grass", "sky")
COLOURS = {"apple": (200, 30, 30), "grass": (30, 180, 40), "sky": (40, 60, 210)}


def make_folder(root, per_class=(8, 3), size=(20, 24), classes=CLASSES, splits=("train", "val")):
    """Noisy images of one colour per class: PNG in train/, JPEG in the eval split."""
    rng = np.random.default_rng(0)
    for split, count in zip(splits, per_class):
        for name in classes:
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.asarray(COLOURS.get(name, (128, 128, 128)))
                                 + rng.normal(0, 25, size + (3,)), 0, 255).astype("uint8")
                ext = "png" if split == "train" else "jpg"
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.{ext}"))
    return str(root)


def test_folder_scan_fills_the_config(tmp_path):
    root = make_folder(tmp_path)
    config = describe_folder(kl.Config(dataset="folder", data_dir=root, image_size=16))
    assert config.class_names == CLASSES and config.image_size == 16
    info = dataset_info(config)
    assert info.input_shape == (16, 16, 3) and info.num_classes == 3
    assert info.mean[0] > info.mean[1] and info.crop_padding == 2  # red-heavy apples
    (x, y), (xv, yv) = load_folder(config)
    assert x.shape == (24, 16, 16, 3) and x.dtype == np.uint8 and list(np.bincount(y)) == [8] * 3
    assert xv.shape == (9, 16, 16, 3)
    np.testing.assert_allclose(x.reshape(-1, 3).mean(0) / 255, info.mean, atol=0.01)


def test_large_images_stream_with_imagenet_transforms(tmp_path):
    root = make_folder(tmp_path, per_class=(2, 1), size=(90, 120))
    config = describe_folder(kl.Config(dataset="folder", data_dir=root, image_size=72,
                                       batch_size=4))
    train, test = load_folder(config)
    assert train[0].dtype.kind in "US"  # file paths: decoded by tf.data
    train_ds, test_ds = make_folder_datasets(config, dataset_info(config), train, test)
    images, labels = next(iter(train_ds))
    assert images.shape == (4, 72, 72, 3)
    images, labels = next(iter(test_ds))
    assert images.shape == (3, 72, 72, 3) and list(labels.numpy()) == [0, 1, 2]


def test_folder_trains_exports_and_predict_names_its_classes(tmp_path, capsys):
    root = make_folder(tmp_path / "images")
    save_dir = tmp_path / "runs"
    code = train_main(["--dataset", "folder", "--data-dir", root, "--image-size", "12",
                       "--model", "mlp", "--num-hidden", "16", "--epochs", "3",
                       "--batch-size", "8", "--lr", "0.01", "--lr-decay-milestones", "50",
                       "--save-dir", str(save_dir), "--no-jit", "--quiet"])
    assert code == 0
    (run_dir,) = [str(p) for p in save_dir.iterdir()]
    metadata = read_json(os.path.join(run_dir, "export", "metadata.json"))
    assert metadata["class_names"] == list(CLASSES)
    assert metadata["input"]["shape"] == [None, 12, 12, 3]
    stored = read_json(os.path.join(run_dir, "config.json"))
    assert stored["class_names"] == list(CLASSES) and len(stored["data_mean"]) == 3
    from export.predict import main as predict_main

    capsys.readouterr()
    image = os.path.join(root, "val", "sky", "0.jpg")
    assert predict_main([os.path.join(run_dir, "export", "model.onnx"), image,
                         "--top-k", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(image + ": ")
    assert sorted(item.rsplit(" ", 1)[0] for item in line.split(": ", 1)[1].split(", ")) \
        == sorted(CLASSES)


@pytest.mark.parametrize("problem,message", [
    ("missing", "does not exist"),
    ("no_train", "has no train/ folder"),
    ("no_classes", "has no class subfolders"),
    ("differing", "class folders differ between"),
    ("undecodable", "cannot decode the image"),
    ("no_data_dir", "needs --data-dir"),
])
def test_bad_folders_fail_in_one_line(tmp_path, capsys, problem, message):
    root = tmp_path / "images"
    if problem == "no_train":
        os.makedirs(root / "val" / "a")
    elif problem == "no_classes":
        os.makedirs(root / "train")
        os.makedirs(root / "val")
    elif problem == "differing":
        make_folder(root, per_class=(2, 1))
        os.rename(root / "val" / "sky", root / "val" / "clouds")
    elif problem == "undecodable":
        make_folder(root, per_class=(2, 1))
        (root / "train" / "sky" / "broken.png").write_bytes(b"not an image at all")
    argv = ["--dataset", "folder", "--model", "mlp", "--save-dir", str(tmp_path / "runs")]
    if problem != "no_data_dir":
        argv += ["--data-dir", str(root)]
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_imagenet_is_the_folder_reader_with_imagenet_normalisation(tmp_path):
    root = make_folder(tmp_path, per_class=(1, 1))
    with pytest.raises(Exception, match="needs ImageNet's 1000 class folders.*has 3"):
        describe_folder(kl.Config(dataset="imagenet", data_dir=root))
    info = dataset_info(kl.Config(dataset="imagenet"))
    assert info.input_shape == (224, 224, 3) and info.num_classes == 1000
    assert info.mean == (0.485, 0.456, 0.406) and info.crop_padding == 0


# ------------------------------------------------------------- bounds and odd folders
def png_claiming(path, width, height):
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (CRC fixed up)."""
    import struct
    import zlib

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IHDR")
    data[start + 4:start + 12] = struct.pack(">II", width, height)
    data[start + 17:start + 21] = struct.pack(">I", zlib.crc32(bytes(data[start:start + 17])))
    path.write_bytes(bytes(data))


def folder_argv(root, tmp_path, *extra):
    return ["--dataset", "folder", "--data-dir", str(root), "--model", "mlp",
            "--save-dir", str(tmp_path / "runs"), *extra]


@pytest.mark.parametrize("image_size", ["12", "96"])  # decoded up front / streamed
def test_folder_image_above_the_pixel_bound_is_refused_from_its_header(tmp_path, capsys,
                                                                       image_size):
    root = tmp_path / "images"
    make_folder(root, per_class=(2, 1))
    png_claiming(root / "train" / "sky" / "bomb.png", 20000, 20000)
    assert train_main(folder_argv(root, tmp_path, "--image-size", image_size)) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("bomb.png: image larger than 89,478,485 pixels"), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_folder_symlink_loop_is_one_line(tmp_path, capsys):
    root = tmp_path / "images"
    make_folder(root, per_class=(2, 1))
    folder = root / "train" / "sky"
    os.symlink("b.png", folder / "a.png")
    os.symlink("a.png", folder / "b.png")
    assert train_main(folder_argv(root, tmp_path, "--image-size", "12")) == 2
    err = capsys.readouterr().err.strip()
    assert "a.png: cannot read the image (Too many levels of symbolic links)" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_folder_with_one_class_is_refused(tmp_path, capsys):
    root = make_folder(tmp_path / "images", per_class=(2, 1), classes=("apple",))
    assert train_main(folder_argv(root, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("has one class folder (apple): a dataset needs two or more classes")
    assert len(err.splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_hidden_folders_are_named_in_one_warning(tmp_path):
    root = tmp_path / "images"
    make_folder(root, per_class=(2, 1))
    os.makedirs(root / "train" / "..x")
    os.makedirs(root / "val" / ".cache")
    with pytest.warns(UserWarning) as caught:
        config = describe_folder(kl.Config(dataset="folder", data_dir=str(root), image_size=8))
    assert config.class_names == CLASSES
    (message,) = [str(w.message) for w in caught if "hidden folders" in str(w.message)]
    assert message == (f"hidden folders skipped (not classes): {root / 'train' / '..x'}, "
                       f"{root / 'val' / '.cache'}")


ODD_CLASSES = ("\x1b[31mred", "new\nline")


@pytest.mark.slow  # trains and exports (~20 s); the train message half below is quick
def test_predict_prints_class_names_with_escapes_escaped(tmp_path, capsys):
    """ANSI escapes and newlines in class folder names are shown as escapes by predict,
    never sent to the terminal."""
    root = make_folder(tmp_path / "images", per_class=(4, 1), classes=ODD_CLASSES)
    save_dir = tmp_path / "runs"
    assert train_main(["--dataset", "folder", "--data-dir", root, "--image-size", "8",
                       "--model", "mlp", "--num-hidden", "8", "--epochs", "1",
                       "--batch-size", "4", "--save-dir", str(save_dir), "--quiet"]) == 0
    (run_dir,) = save_dir.iterdir()
    from export.predict import main as predict_main

    capsys.readouterr()
    image = os.path.join(root, "val", ODD_CLASSES[1], "0.jpg")
    assert predict_main([str(run_dir / "export" / "model.onnx"), image]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.count("\n") == 1, out
    assert "\\x1b[31mred" in out and "new\\nline" in out


def test_train_prints_class_names_with_escapes_escaped(tmp_path, capsys):
    root = make_folder(tmp_path / "images", per_class=(2, 1), classes=ODD_CLASSES)
    os.rename(os.path.join(root, "val", ODD_CLASSES[0]), os.path.join(root, "val", "other"))
    assert train_main(folder_argv(root, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and err.count("\n") == 1 and "(\\x1b[31mred, new\\nline)" in err
