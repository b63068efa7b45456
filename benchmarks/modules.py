#!/usr/bin/env python
"""Speed and memory against the number of local modules K (one table).

    python benchmarks/modules.py                                  # resnet18, 32x32x3, batch 128
    python benchmarks/modules.py --feat-mult 0.25 --batch-size 32 --image-size 16   # small

Rows: K = every layer (the paper: each layer its own module), 4, 2, 1 (end to end with
one auxiliary head), and backprop (no heads). Throughput is timed in this process with
benchmarks/throughput.py's windows (no XLA: the same choice for every row); peak memory
of one step above the between-steps baseline comes from benchmarks/memory.py's child
process (TensorFlow allocator statistics). Prints a Markdown table, writes JSON.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_network, cached_batches, time_variants, write_json  # noqa: E402

ROWS = ("every", "4", "2", "1", "backprop")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18", choices=("resnet18", "wresnet16-4", "vgg11b"))
    p.add_argument("--feat-mult", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--window-seconds", type=float, default=3.0)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--json", default=os.path.join(tempfile.gettempdir(), "keras_local_modules.json"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import memory
    from keras_local.steps.rule import plan

    shape = (args.image_size, args.image_size, 3)
    load_before = os.getloadavg()
    results = []
    for row in args.rows:
        mode = "backprop" if row == "backprop" else "predsim"
        modules = None if row in ("every", "backprop") else int(row)
        timing = argparse.Namespace(batch_size=args.batch_size, warmup_steps=2, quick=False,
                                    window_seconds=args.window_seconds, windows=args.windows)
        model = build_network(args.model, shape, mode, "none", args.batch_size,
                              feat_mult=args.feat_mult, modules=modules)
        segments = len(plan(model))
        (step_s, rates, _), = time_variants(
            {"none": model}, cached_batches(shape, args.batch_size), timing).values()
        mem_args = argparse.Namespace(batch_size=args.batch_size, image_size=args.image_size,
                                      steps=1, xla="none", feat_mult=args.feat_mult,
                                      modules=modules)
        mem = memory.measure(args.model, mode, mem_args)
        results.append({"K": row, "segments": segments, "images_per_s": args.batch_size / step_s,
                        "window_images_per_s": rates,
                        "peak_above_baseline_mib": mem["peak_above_baseline_mib"]})
        print(f"  K={row}: {results[-1]['images_per_s']:.1f} images/s, "
              f"{mem['peak_above_baseline_mib']:.0f} MiB", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    print(f"\n{args.model} feat_mult {args.feat_mult}, {shape}, batch {args.batch_size}, CPU, "
          f"no XLA; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after\n")
    print("| K (modules) | segments | images/s | peak memory above baseline (MiB) |")
    print("| --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['K']} | {r['segments']} | {r['images_per_s']:.1f} | "
              f"{r['peak_above_baseline_mib']:.0f} |")
    write_json(args.json, {"options": vars(args), "load_average_before": load_before,
                           "load_average_after": load_after, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
