"""What must be settled before TensorFlow starts: its import without the C++ start-up noise
(and with oneDNN), and XLA's cache of compiled programs (``use_xla_cache``).

On a machine without a GPU, TensorFlow 2.21 writes straight to file descriptor 2, before
``TF_CPP_MIN_LOG_LEVEL`` takes effect (absl's logging is not initialised yet):

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
    (both twice, at import)
    E0000 ... cuda_platform.cc:52] failed call to cuInit: ... UNKNOWN ERROR (303)
    (at the first device query)
    I0000 ... port.cc:153] oneDNN custom operations are on. ... (twice, with oneDNN on)

``quiet_start()`` imports TensorFlow and lists its devices with file descriptor 2 sent to a
temporary file, then writes back every captured line that is not one of those, so Python
warnings and real errors of the import still show. Setting ``TF_CPP_MIN_LOG_LEVEL`` to 0 or 1
(asking for TensorFlow's informational logs) turns the filter off.
"""

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import tempfile
import threading

NOISE = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|^[IWE]\d{4} [\d:. ]+\d+ (cudart_stub|cuda_platform|cuda_executor|cuda_dnn|cuda_fft"
    rb"|cuda_blas|cpu_feature_guard|port)\.cc:\d+\]"
    rb"|^To enable the following instructions: .*rebuild TensorFlow")
# TensorFlow reads every entry of the XLA program cache as a text proto first and, when that
# fails (the entries are binary), as a binary one: each load of a cached program logs this at
# ERROR level although it then loads fine.
XLA_CACHE_NOISE = re.compile(
    rb"^E\d{4} [\d:. ]+\d+ text_format\.cc:\d+\] Error parsing text-format "
    rb"tensorflow\.XlaSerializedCacheEntry")
# How a line of TensorFlow's C++ logging begins: a partial line that starts so is held back
# until its end shows whether it is noise.
LOG_LINE_START = re.compile(rb"^[IWEF](\d{0,4}$|\d{4} )")


def quiet_start(import_tensorflow=None):
    """Import TensorFlow (when installed) without its start-up noise; idempotent.

    ``import_tensorflow``: None imports it only when Keras will run on it
    (``KERAS_BACKEND``, default tensorflow), so that ``import keras_local`` on JAX or torch
    loads no TensorFlow; True imports it whenever it is installed (train.py, whose input
    pipeline is tf.data on every backend).

    It also sets the default of ``TF_ENABLE_ONEDNN_OPTS`` to 1 (an explicit setting wins):
    the TensorFlow 2.21 x86 wheel leaves oneDNN's kernels off on CPUs without AVX-512
    (``IsMklEnabled()`` False on an AVX2 EPYC), and with them on a vgg8b step ran 1.15-1.25x
    (predsim) and 1.6x (backprop) faster there (docs/benchmarks.md section 6). It has to be
    set before TensorFlow is imported, which is why it lives here, in every entry point's
    first call.
    ``train.py --deterministic`` sets it to 0 first: with oneDNN on, a run resumed after a
    SIGKILL ended 1e-6 away from the uninterrupted one despite enable_op_determinism
    (tests/test_reliability.py; with it off the two are bit-identical).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    if import_tensorflow is None:
        import_tensorflow = os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow"
    if (not import_tensorflow or "tensorflow" in sys.modules
            or importlib.util.find_spec("tensorflow") is None):
        return
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] in ("0", "1"):
        return
    with filtered_stderr(NOISE):
        import tensorflow as tf

        tf.config.list_physical_devices()  # probes CUDA now, inside the filter


def use_xla_cache(folder):
    """Let TensorFlow's XLA keep the programs it compiles in ``folder`` between processes
    (its ``--tf_xla_persistent_cache_directory``): a later process that compiles the same
    program (the mlp's whole step, a conv net's optimiser update) loads it instead. Call it
    before TensorFlow is imported. The programs go into a subfolder per TensorFlow version
    and CPU (a program compiled for one instruction set must not run on another). Returns
    that subfolder, or None where nothing is cached: ``folder`` None or "none", TensorFlow
    not installed, an explicit cache directory in ``TF_XLA_FLAGS`` (it wins), or a folder
    that cannot be created or written (then a run just compiles, as without a cache)."""
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if not folder or folder == "none" or "tf_xla_persistent_cache_directory" in flags:
        return None
    try:
        version = importlib.metadata.version("tensorflow")
    except importlib.metadata.PackageNotFoundError:
        return None
    target = os.path.join(os.path.expanduser(folder), f"tensorflow-{version}-{_cpu_id()}")
    if any(character.isspace() for character in target):  # TF_XLA_FLAGS splits on spaces
        return None
    try:
        os.makedirs(target, exist_ok=True)
    except OSError:
        return None
    if not os.access(target, os.W_OK | os.X_OK):
        return None
    os.environ["TF_XLA_FLAGS"] = f"{flags} --tf_xla_persistent_cache_directory={target}".strip()
    return target


def _cpu_id():
    """A short hash of this CPU's model and instruction-set flags (Linux's /proc/cpuinfo;
    elsewhere the platform's description)."""
    import platform

    description = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as stream:
            lines = [line for line in stream if line.startswith(("model name", "flags"))]
        description += "".join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha256(description.encode()).hexdigest()[:12]


def _saved_stderr():
    """A duplicate of file descriptor 2, taken after Python's stderr is flushed; None where
    the process has no file descriptor 2."""
    sys.stderr.flush()
    try:
        return os.dup(2)
    except OSError:
        return None


@contextlib.contextmanager
def live_filtered_stderr(noise):
    """Sends file descriptor 2 through a pipe for the duration: a reader thread drops the
    lines that ``noise`` (a bytes regex) matches and passes every other one on at once (unlike
    ``filtered_stderr``, which holds all until the end: fit for the whole of a training run)."""
    saved = _saved_stderr()
    if saved is None:  # no file descriptor 2 (a daemon): nothing to keep quiet
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward():
        pending = b""
        while chunk := os.read(read_end, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if not noise.search(line):
                    _write_all(saved, line + b"\n")
            if pending and not LOG_LINE_START.match(pending):
                _write_all(saved, pending)  # a prompt or progress without its newline yet
                pending = b""
        if pending and not noise.search(pending):
            _write_all(saved, pending)

    reader = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    reader.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the reader reads to its end
        # A child process started meanwhile may still hold the pipe: do not wait on it for long.
        reader.join(timeout=5)
        if not reader.is_alive():  # else the reader keeps both descriptors until its end
            os.close(saved)
            os.close(read_end)


def _write_all(descriptor, data):
    while data:
        data = data[os.write(descriptor, data):]


@contextlib.contextmanager
def filtered_stderr(noise):
    """Sends file descriptor 2 (C++ and Python writes alike) to a temporary file; on exit
    writes back the lines that ``noise`` (a bytes regex) does not match, in order."""
    saved = _saved_stderr()
    if saved is None:  # no file descriptor 2 (a daemon): nothing to keep quiet
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().splitlines(keepends=True):
                if not noise.search(line):
                    os.write(2, line)
