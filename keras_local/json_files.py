"""JSON result files written whole or not at all."""

import json
import os


def write_json_atomically(path, payload):
    """Write ``payload`` to ``path`` through a temporary name, then rename: a reader never
    sees a half-written file."""
    temporary = path + ".tmp"
    with open(temporary, "w") as stream:
        json.dump(payload, stream, indent=2, sort_keys=True)
    os.replace(temporary, path)
