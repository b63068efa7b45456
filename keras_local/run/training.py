"""run(config): data, model, callbacks, fit, final evaluation and export of one run.

A run directory (``<save_dir>/<dataset>_<model>_<mode>_<time>``) holds:
  config.json            every option of the run
  logs/                  TensorBoard: train/validation loss and error, learning rate,
                         epoch time, per-block pred loss, sim loss and local-head error
                         (section block_k); the run's HParams; logs/similarity:
                         per-block similarity images
  history.csv            the same per-epoch numbers as CSV
  checkpoints/last.keras the whole model after the last completed epoch
  backup/                Keras BackupAndRestore state (removed when the run completes)
  model.keras            the final model;  results.json: final test loss / error, best
                         epoch, wall time and training images/s (of the last session
                         when resumed)
  export/                SavedModel + ONNX + metadata of the inference network
  run.lock               held (flock) by the process training in the directory

A resumed run continues from what is on disk and never deletes it (``keras_local.run.resume``).
"""

import contextlib
import dataclasses
import errno
import os
import tempfile
import time
import warnings

import keras

from keras_local.run.json_files import WriteError, read_json_file, write_json_atomically
from keras_local.models import list_models
from keras_local.run.callbacks import (
    AtomicCheckpoint,
    CompactProgbar,
    HParamsSummary,
    SimilarityImages,
    class_sorted_sample,
    NaNGuard,
    EpochTimes,
    GroupedTensorBoard,
    RandomStreams,
    milestone_scheduler,
    save_model_atomically,
)
from keras_local.cli import EXPORT_COMMAND
from keras_local.config import Config
from keras_local.data import (
    load_arrays,
    make_datasets,
    make_numpy_datasets,
    tensorflow_available,
)
from keras_local.data.catalogue import dataset_info, list_datasets
from keras_local.data.pipeline import (
    EpochClock,
    feeds_epochs_forever,
    normalise_numpy,
    steps_per_epoch,
)
from keras_local.models.local_model import LocalModel
from keras_local.models.local_model import check_network_support
from keras_local.run.resume import restore


class NotARunError(ValueError):
    """--resume was given a directory that is not a keras-local run."""


class RunFinished(Exception):
    """--resume was given a run that already finished: nothing to do."""


class RunInUseError(RuntimeError):
    """Another process trains in this run directory."""


@dataclasses.dataclass
class RunResult:
    run_dir: str
    test_loss: float
    test_error: float
    epochs_completed: int
    export_dir: str = None
    best_test_error: float = None
    best_epoch: int = None          # 1-based
    wall_seconds: float = None      # this session: data pipeline, fit, final test, save
    images_per_second: float = None  # training images per second of fit (test pass included)


def resolve_resume(config):
    """The Config stored in ``config.resume`` (a run directory), pointing back at it."""
    run_dir = config.resume
    path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise NotARunError(f"--resume {run_dir}: no such directory")
    if not os.path.isfile(path):
        raise NotARunError(f"--resume {run_dir}: not a run directory (no config.json)")
    try:
        values = read_json_file(path)
        if not isinstance(values, dict):
            raise ValueError(f"expected a JSON object, got {type(values).__name__}")
        stored = Config.from_dict(values)
    except (ValueError, TypeError) as error:
        raise NotARunError(f"--resume {run_dir}: unreadable config.json ({error})") from None
    if os.path.isfile(os.path.join(run_dir, "results.json")):
        raise RunFinished(f"{run_dir} already finished, nothing to do")
    return stored.replace(resume=run_dir)


def check_run_size(config):
    """ModelFileError (one line) when the run's model, heads and optimiser slots included,
    exceeds the parameter bound or the memory available; checked before anything is built."""
    from keras_local.run.model_files import check_model_size

    info = dataset_info(config)
    source = (f"--resume {config.resume}: config.json" if config.resume
              else f"--model {config.model}")
    estimate = check_model_size(config.model, info.input_shape, info.num_classes, config,
                                source=source)
    if config.resume:
        from keras_local.run.model_files import check_resume_states

        check_resume_states(config.resume, estimate)


def new_run_dir(config, shared=False):
    """A fresh run directory under ``config.save_dir``. ``shared``: the workers of a
    multi-worker cluster must agree on it, so it has no timestamp and may exist."""
    mode = config.training_mode + ("-bio" if config.bio else "")
    stem = f"{config.dataset}_{config.model}_{mode}"
    if shared:
        return os.path.join(config.save_dir, f"{stem}_multiworker")
    stem += time.strftime("_%Y%m%d-%H%M%S")
    path = os.path.join(config.save_dir, stem)
    suffix = 1
    while os.path.exists(path):
        suffix += 1
        path = os.path.join(config.save_dir, f"{stem}-{suffix}")
    return path


def create_run_dir(config, shared=False):
    """Create and return a new run directory. ``os.mkdir`` fails if the name exists, so
    two runs started at the same moment never share one: the loser retries with a suffix."""
    path = new_run_dir(config, shared=shared)
    _make_dirs(os.path.dirname(path) or ".")
    if shared:
        _make_dirs(path)
        return path
    base, suffix = path, 1
    while True:
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            suffix += 1
            path = f"{base}-{suffix}"
        except OSError as error:
            raise WriteError(error.errno, f"cannot write {path}: "
                                          f"{error.strerror or error}") from None


def _make_dirs(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise WriteError(error.errno, f"cannot write {path}: {error.strerror or error}") from None


def check_writable(config):
    """WriteError (one line) unless the run directory can be written: the resumed one, or
    a new one under ``config.save_dir``, probed with a nameless temporary file in the
    nearest existing folder. Checked before the data are loaded; writes nothing that stays."""
    wanted = config.resume or config.save_dir or "."
    folder = os.path.abspath(wanted)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise WriteError(errno.ENOTDIR, f"cannot write {wanted}: {folder} is a file, "
                                        f"not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise WriteError(error.errno, f"cannot write {wanted}: {folder}: "
                                      f"{error.strerror or error}") from None


LOCK_FILE = "run.lock"


def lock_run_dir(run_dir):
    """Hold ``run_dir`` for this process: an exclusive ``flock`` on its ``run.lock``,
    released by the OS when the returned file is closed or the process ends (a crash
    included). RunInUseError when another process holds it."""
    import fcntl

    path = os.path.join(run_dir, LOCK_FILE)
    try:
        stream = open(path, "a")
    except OSError as error:
        raise WriteError(error.errno, f"cannot write {path}: {error.strerror or error}") from None
    try:
        fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        stream.close()
        raise RunInUseError(f"{run_dir} is in use by another process (it holds {path}); "
                            f"wait for it to end or stop it") from None
    return stream


@dataclasses.dataclass
class PreparedRun:
    """A validated run: data loaded and model built, nothing written yet."""
    config: Config
    train: tuple
    test: tuple
    model: keras.Model
    strategy: object = None  # tf.distribute.Strategy on TensorFlow, else None
    # (normalised images, labels) of the per-block similarity pictures, or None
    similarity_sample: tuple = None


def check_backend_support(config, backend):
    """ValueError, naming the backend that supports them, for options this backend
    cannot train with; everything else trains the same on every backend."""
    if backend != "tensorflow":
        options = []
        if config.pipeline:
            options.append("the pipelined mode (pipeline=True)")
        if config.placement != "none":
            options.append(f"placement={config.placement!r}")
        if config.strategy in ("mirrored", "multiworker"):
            options.append(f"strategy={config.strategy!r}")
        if options:
            raise ValueError(
                f"{' and '.join(options)}: supported on the tensorflow backend only, but Keras "
                f"is running on {backend!r}; set KERAS_BACKEND=tensorflow (train.py --backend "
                f"tensorflow) or leave these options at their defaults")
    check_network_support(config, backend)


def build_model(name, input_shape, num_classes, config=None):
    """The named architecture (``list_models()``) as a LocalModel for a run of ``config``:
    this is where the run's options reach the model. Layer-wise placement, the pipelined
    executor and (on TensorFlow) the replica-state scope of the variables are decided here
    and handed to the model; the dataset's normalisation travels with it when
    ``config.dataset`` is a known dataset of that input shape."""
    config = Config() if config is None else config
    backend = keras.backend.backend()
    check_backend_support(config, backend)
    placement = variable_scope = None
    if backend == "tensorflow":
        distribute = _distribute()
        if config.pipeline or config.placement != "none":
            distribute.check_scale_out(config)
        if config.placement == "layerwise":
            placement = distribute.layerwise_devices
        variable_scope = distribute.mean_aggregated_state  # BatchNorm statistics: replica mean
    return LocalModel(name, input_shape, num_classes, config, placement=placement,
                      pipelined=config.pipeline, variable_scope=variable_scope,
                      preprocessing=_preprocessing(config, input_shape, num_classes))


def _preprocessing(config, input_shape, num_classes):
    """The dataset's name, normalisation and class names (for image folders: those of the
    folder), or None when ``config.dataset`` is unknown or its channels or classes differ
    from the model's (the normalisation is per channel, so any image size will do)."""
    if config.dataset not in list_datasets():
        return None
    info = dataset_info(config)
    if info.input_shape[-1] != input_shape[-1] or info.num_classes != num_classes:
        return None
    return {"dataset": info.name, "mean": list(info.mean), "std": list(info.std),
            "class_names": list(info.class_names)}


def make_run_strategy(config):
    """The tf.distribute strategy of the run (None on JAX / torch, which run on one device)."""
    if config.backend == "tensorflow":
        from keras_local.run.distribute import make_strategy

        return make_strategy(config)
    if config.strategy not in ("auto", "one") or config.placement != "none":
        raise ValueError(f"strategy {config.strategy!r} and placement {config.placement!r} "
                         f"need backend 'tensorflow', got {config.backend!r}")
    return None


def prepare(config):
    """Validate ``config``, load the data and build the model. Writes nothing, so bad
    input (unknown names, missing or corrupt files, a bad --resume) fails cleanly."""
    if config.resume:
        config = resolve_resume(config)
    if config.model not in list_models():
        raise ValueError(f"unknown model {config.model!r}; choose one of {', '.join(list_models())}")
    if keras.backend.backend() != config.backend:
        raise ValueError(f"config.backend is {config.backend!r} but Keras runs on "
                         f"{keras.backend.backend()!r}: set KERAS_BACKEND={config.backend} "
                         f"before importing keras (train.py --backend does)")
    check_writable(config)
    if config.dataset in ("folder", "imagenet") and not config.class_names:
        from keras_local.data.folders import describe_folder

        config = describe_folder(config)  # class names, image size, mean / std
    info = dataset_info(config)
    check_run_size(config)
    strategy = make_run_strategy(config)  # before any other TensorFlow op
    if config.deterministic and config.backend == "tensorflow":
        import tensorflow as tf
        from tensorflow.python.util import _pywrap_util_port

        tf.config.experimental.enable_op_determinism()
        if _pywrap_util_port.IsMklEnabled():
            warnings.warn("deterministic=True with oneDNN kernels on: reruns and resumes may "
                          "differ in the last bits; set TF_ENABLE_ONEDNN_OPTS=0 before "
                          "TensorFlow is imported (train.py --deterministic does)",
                          stacklevel=2)
    keras.utils.set_random_seed(config.seed)
    train, test = load_arrays(config)
    sample = similarity_sample(config, test)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = build_model(config.model, info.input_shape, info.num_classes, config)
        model.compile()
    return PreparedRun(config=config, train=train, test=test, model=model, strategy=strategy,
                       similarity_sample=sample)


def _distribute():
    from keras_local.run import distribute

    return distribute


def run(config, verbose=1, export=True):
    """Train ``config`` end to end; returns a RunResult. See the module docstring."""
    return train_prepared(prepare(config), verbose=verbose, export=export)


def train_prepared(prepared, verbose=1, export=True):
    """Train a prepared run in its run directory (created now, or the resumed one), which
    this process holds (``lock_run_dir``) until it returns. Raises ResumeError,
    RunInUseError or WriteError (one line each) having destroyed nothing."""
    started = time.perf_counter()
    config, strategy = prepared.config, prepared.strategy
    multi_worker = strategy is not None and _distribute().is_multi_worker(strategy)
    chief = strategy is None or _distribute().is_chief(strategy)
    if config.resume:
        run_dir = config.resume
    elif chief:
        run_dir = create_run_dir(config, shared=multi_worker)
    else:
        run_dir = new_run_dir(config, shared=multi_worker)
    if not chief:
        # Every worker trains; only the chief writes the run's shared files.
        run_dir = _distribute().per_worker_path(run_dir, strategy)
        export = False
    _make_dirs(run_dir)
    with lock_run_dir(run_dir):
        if config.resume and os.path.isfile(os.path.join(run_dir, "results.json")):
            raise RunFinished(f"{run_dir} already finished, nothing to do")  # meanwhile
        return _train_in(prepared, run_dir, chief, started, verbose, export)


def _train_in(prepared, run_dir, chief, started, verbose, export):
    config, model, train, test = prepared.config, prepared.model, prepared.train, prepared.test
    strategy = prepared.strategy
    initial_epoch = 0
    if config.resume:
        point = restore(run_dir, model, config.epochs)
        initial_epoch = point.epochs_completed
        if point.notice:
            print(f"resume: {point.notice}")
    if not config.resume:
        write_json_atomically(os.path.join(run_dir, "config.json"), config.to_dict())
    if verbose:
        print(f"run directory: {run_dir}")
        print(f"{config.model} on {config.dataset}: {len(train[0])} training and "
              f"{len(test[0])} test images, mode {config.training_mode}"
              f"{' (bio)' if config.bio else ''}, "
              f"{model.inference_model().count_params():,} backbone parameters")

    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    # config.batch_size is per replica (the similarity matrix and BatchNorm see it).
    with_tensorflow = tensorflow_available()
    pipeline = make_datasets if with_tensorflow else make_numpy_datasets
    clock = EpochClock()
    global_batches = config.replace(batch_size=config.batch_size * replicas)
    # One tf.data iterator for the whole run where the data allow it (see make_datasets).
    forever = with_tensorflow and feeds_epochs_forever(config, train)
    train_ds, test_ds = pipeline(global_batches, train, test, epoch_clock=clock,
                                 **({"first_epoch": initial_epoch} if forever else {}))
    steps = steps_per_epoch(global_batches, len(train[1])) if forever else None
    csv_logger = keras.callbacks.CSVLogger(os.path.join(run_dir, "history.csv"),
                                           append=bool(config.resume))
    # BackupAndRestore last: when its epoch-end state exists, the checkpoint, CSV row and
    # TensorBoard scalars of that epoch exist too. RandomStreams first (see its doc), then
    # EpochTimes (its epoch_seconds must reach the loggers).
    callbacks = [
        RandomStreams(clock),
        EpochTimes(),
        NaNGuard(run_dir),
        milestone_scheduler(config),
        AtomicCheckpoint(os.path.join(run_dir, "checkpoints", "last.keras")),
        csv_logger,
        keras.callbacks.BackupAndRestore(os.path.join(run_dir, "backup")),
    ]
    if with_tensorflow:  # TensorBoard's writer needs TensorFlow
        callbacks.insert(-1, GroupedTensorBoard(os.path.join(run_dir, "logs"),
                                                write_graph=False))
    elif verbose:
        print("TensorFlow is not installed: no TensorBoard logs (history.csv has the numbers)")
    if with_tensorflow and keras.backend.backend() == "tensorflow":
        callbacks[-1:-1] = tensorboard_method_callbacks(config, run_dir,
                                                        prepared.similarity_sample)
    if verbose:
        callbacks.append(CompactProgbar())
    if verbose:
        print(first_step_notice(model), flush=True)
    fit_started = time.perf_counter()
    try:
        history = model.fit(train_ds, epochs=config.epochs, steps_per_epoch=steps,
                            validation_data=test_ds, shuffle=False,
                            callbacks=callbacks, verbose=verbose, initial_epoch=initial_epoch)
    finally:
        # Closes history.csv: fit skips on_train_end when an exception (Ctrl-C, a full
        # disk, a non-finite loss) ends the run.
        csv_logger.on_train_end()
    fit_seconds = time.perf_counter() - fit_started

    scores = model.evaluate(test_ds, verbose=0, return_dict=True)
    save_model_atomically(model, os.path.join(run_dir, "model.keras"))
    result = RunResult(run_dir=run_dir, test_loss=float(scores["loss"]),
                       test_error=float(scores["error"]), epochs_completed=config.epochs)
    if history.epoch:  # empty when a resumed run had no epoch left
        result.images_per_second = len(train[0]) * len(history.epoch) / fit_seconds
    result.wall_seconds = time.perf_counter() - started
    if chief:
        from keras_local.report import read_run

        recorded = read_run(run_dir)  # every epoch of the run, earlier sessions included
        result.best_test_error, result.best_epoch = recorded.best_test_error, recorded.best_epoch
    if export and keras.backend.backend() != "tensorflow":
        export = False
        print(f"export skipped: it needs the tensorflow backend; run "
              f"`{EXPORT_COMMAND} {run_dir}` where TensorFlow is installed")
    if export:
        result.export_dir = os.path.join(run_dir, "export")
    # results.json marks the training as finished; the export can be redone with
    # `keras-local-export RUN_DIR` if it fails.
    write_json_atomically(os.path.join(run_dir, "results.json"), dataclasses.asdict(result))
    if export:
        from keras_local.exporting import export_model

        export_model(model, result.export_dir, check_images=_check_images(config, test),
                     test_error=result.test_error, run_config=config.to_dict())
    if verbose:
        from keras_local.report import run_summary

        print("\n".join(run_summary(run_dir, exported=bool(export))))
    return result


def first_step_notice(model):
    """What the silent first step does, printed before it starts."""
    blocks = len(model.local_blocks)
    how = ("TensorFlow traces the training step into one graph, optimises it and "
           + ("XLA compiles it" if model.jit_compile
              else "XLA compiles its optimiser update" if model.xla_update
              else "runs it"))
    count = f"{blocks} local block" + ("s" if blocks != 1 else "")
    return (f"building the training step of {model.architecture} ({count}): "
            f"{how};\nthe first step takes longer than the others (seconds for an mlp, "
            f"up to a minute or two for a deep conv net on a CPU)")


def similarity_sample(config, test):
    """(normalised images, labels): the ``config.similarity_examples`` test images of the
    similarity pictures, sorted by class; None when there are none (or no TensorFlow).
    Decoded here, before the run directory exists, as large image folders hold paths."""
    if not config.similarity_examples or keras.backend.backend() != "tensorflow":
        return None
    chosen = class_sorted_sample(test[1], config.similarity_examples)
    images = _check_images(config, (test[0][chosen],), limit=len(chosen))
    return normalise_numpy(images, dataset_info(config)), test[1][chosen]


def tensorboard_method_callbacks(config, run_dir, sample):
    """The run's HParams, and per-block similarity images of ``sample`` (similarity_sample)
    after each epoch (TensorFlow backend)."""
    log_dir = os.path.join(run_dir, "logs")
    callbacks = [HParamsSummary(log_dir, config, trial_id=os.path.basename(run_dir))]
    if sample is not None:
        images, labels = sample
        callbacks.append(SimilarityImages(os.path.join(log_dir, "similarity"), images, labels,
                                          dataset_info(config).num_classes))
    return callbacks


def _check_images(config, test, limit=None):
    """Raw-pixel test images for the export's parity check (decoded for image folders)."""
    if config.dataset in ("folder", "imagenet"):
        from keras_local.data.folders import check_images

        return check_images(config, test, limit=limit or 64)
    return test[0][:limit or 256]
