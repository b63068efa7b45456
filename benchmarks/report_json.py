"""What every benchmark script's JSON result needs: the CPU's name, an atomic write."""

import json
import os
import platform


def write_json(path, payload):
    """Write ``payload`` to ``path`` through a temporary name (never a half-written file)
    and print where it went."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".partial"
    with open(partial, "w") as stream:
        json.dump(payload, stream, indent=2)
    os.replace(partial, path)
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
