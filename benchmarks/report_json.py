"""What every benchmark script's JSON result needs: the CPU's name, an atomic write."""

import os
import platform

from keras_local.json_files import write_json_atomically


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
