"""What every benchmark script's JSON results need: a child process's result line, the
CPU's name, an atomic write."""

import json
import os
import platform

from keras_local.run.json_files import write_json_atomically


def tagged_json(done, tag, what, require_exit_zero=False):
    """The JSON after ``tag`` on the last stdout line of the finished process ``done``
    (``subprocess.run``'s result) that starts with it. RuntimeError naming ``what``, with
    the end of its stderr, where the process printed no such line (or, with
    ``require_exit_zero``, exited with another code)."""
    lines = [line for line in done.stdout.splitlines() if line.startswith(tag + " ")]
    if not lines or (require_exit_zero and done.returncode != 0):
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(tag) + 1:])


def write_json(path, payload):
    """``write_json_atomically`` into a folder made if needed; prints where it went."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomically(path, payload)
    print(f"wrote {path}")


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` says)."""
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
