"""keras_local.report: curves + table of several runs, bad run directories, and the summary
printed at the end of a run; the timing that training records for them."""

import csv
import json
import os
import shutil
import subprocess

import pytest
from PIL import Image

from keras_local.report import main as report_main
from keras_local.report import run_summary

from helpers import console_script


def history(run_dir):
    with open(os.path.join(run_dir, "history.csv")) as stream:
        return list(csv.DictReader(stream))


def results(run_dir):
    with open(os.path.join(run_dir, "results.json")) as stream:
        return json.load(stream)


def test_results_record_best_epoch_wall_time_and_images_per_second(tiny_runs):
    for run_dir in tiny_runs.values():
        recorded, rows = results(run_dir), history(run_dir)
        test_errors = [float(row["val_error"]) for row in rows]
        assert len(rows) == 2
        assert recorded["best_test_error"] == pytest.approx(min(test_errors))
        assert recorded["best_epoch"] == test_errors.index(min(test_errors)) + 1
        assert recorded["wall_seconds"] > 0
        # 2 epochs of 256 images cannot take longer than the whole session
        assert recorded["images_per_second"] >= 2 * 256 / recorded["wall_seconds"]


def test_report_draws_one_png_and_prints_a_row_per_run(tiny_runs, tmp_path, capsys):
    png = tmp_path / "curves.png"
    assert report_main([tiny_runs["predsim"], tiny_runs["backprop"], "-o", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["run", "epochs"]
    rows = {line.split()[1]: line for line in out[1:3]}
    assert set(rows) == {"predsim", "backprop"}
    for mode, run_dir in tiny_runs.items():
        recorded = results(run_dir)
        cells = rows[mode].split()
        assert cells[0] == "mlp" and cells[2] == "2"
        assert cells[3] == f"{recorded['test_error']:.2f}%"
        assert cells[4] == f"{recorded['best_test_error']:.2f}%"
        assert cells[5] == str(recorded["best_epoch"])
        assert cells[-1] == run_dir
    assert out[-1] == f"curves: {png}"
    with Image.open(png) as picture:
        assert picture.format == "PNG" and picture.size == (750, 450)
        colours = picture.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 20  # curves drawn, not a blank canvas
    assert os.listdir(tmp_path) == ["curves.png"]  # no temporary file left


def make_bad(kind, root, good):
    path = root / kind.replace(" ", "_")
    if kind == "missing":
        return path
    if kind == "no config.json":
        path.mkdir()
        return path
    shutil.copytree(good, path)
    if kind == "corrupt history.csv":
        (path / "history.csv").write_text("epoch,loss\n0,abc\n")
    elif kind == "empty history.csv":
        (path / "history.csv").write_text("epoch,error,val_error\n")
    elif kind == "config.json not JSON":
        (path / "config.json").write_text("{not json")
    elif kind == "config.json nested 100,000 deep":  # a RecursionError traceback before
        (path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return path


@pytest.mark.parametrize("kind,message", [
    ("missing", "no such directory"),
    ("no config.json", "not a run directory (no config.json)"),
    ("corrupt history.csv", "not a keras-local history"),
    ("empty history.csv", "no completed epoch yet"),
    ("config.json not JSON", "not readable JSON"),
    ("config.json nested 100,000 deep", "nested deeper than the limit of 32 levels"),
])
def test_bad_run_dir_one_line_exit_2_no_png(kind, message, tiny_runs, tmp_path, capsys):
    bad = make_bad(kind, tmp_path, tiny_runs["predsim"])
    png = tmp_path / "curves.png"
    with pytest.raises(SystemExit) as exit_info:
        report_main([tiny_runs["predsim"], str(bad), "-o", str(png)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and str(bad) in captured.err and message in captured.err
    assert not png.exists()


def test_bad_output_path_one_line_exit_2(tiny_runs, tmp_path, capsys):
    for output, message in ((tmp_path / "curves.txt", "must end in .png"),
                            (tmp_path / "no" / "curves.png", "no such directory")):
        with pytest.raises(SystemExit) as exit_info:
            report_main([tiny_runs["predsim"], "-o", str(output)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err


def test_end_of_run_summary_names_results_places_and_next_commands(tiny_runs, tmp_path):
    run_dir = tiny_runs["predsim"]
    recorded = results(run_dir)
    lines = run_summary(run_dir, exported=False)
    text = "\n".join(lines)
    assert lines[0].startswith("done: mlp predsim on fashion_mnist_demo, 2 epochs")
    assert f"test error       {recorded['test_error']:.2f}% (best " \
           f"{recorded['best_test_error']:.2f}% at epoch {recorded['best_epoch']})" in text
    assert f"{recorded['images_per_second']:,.0f} training images/s" in text
    assert f"run directory    {run_dir}" in text
    assert f"tensorboard --logdir {os.path.join(run_dir, 'logs')}" in text
    assert f"keras-local-export {run_dir}   # SavedModel + ONNX into saved_models/" in text
    assert f"keras-local-report {run_dir} [OTHER_RUN ...] -o curves.png" in text
    assert "exported model   none yet (keras-local-export, below)" in text
    assert "python -m" not in text
    name = os.path.basename(run_dir)
    assert f"keras-local-predict saved_models/{name}/model.onnx IMAGE.png" in text
    # After an export at the end of the run, predict points at the run's own ONNX file.
    exported = tmp_path / name
    shutil.copytree(run_dir, exported)
    (exported / "export").mkdir()
    (exported / "export" / "model.onnx").write_bytes(b"")
    text = "\n".join(run_summary(str(exported), exported=True))
    assert f"exported model   {exported / 'export'}" in text
    assert f"keras-local-predict {exported / 'export' / 'model.onnx'} IMAGE.png" in text


def test_keras_local_report_console_script_runs(tiny_runs, tmp_path):
    """The installed entry point (not only main()): table and PNG; bad input in one line
    named after the script, exit code 2."""
    report = console_script("keras-local-report")
    done = subprocess.run([report, tiny_runs["predsim"], tiny_runs["backprop"], "-o",
                           "both.png"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == ["run", "epochs"] and len(lines) == 4
    assert {line.split()[1] for line in lines[1:3]} == {"predsim", "backprop"}
    assert lines[-1] == "curves: both.png"
    with Image.open(tmp_path / "both.png") as picture:
        assert picture.format == "PNG"
    missing = tmp_path / "no_run"
    bad = subprocess.run([report, str(missing)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == f"keras-local-report: error: {missing}: no such directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["both.png"]
