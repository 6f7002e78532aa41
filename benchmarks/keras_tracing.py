"""Time to the first Hessian-vector product of a Keras model, and of the products after it.

A Keras MobileNetV3Small (``keras.applications``, ``weights=None``, random init, 10
classes, 32x32 inputs by default), float32, two batches of unequal size (8 and 5
samples), one thread. For each engine of :func:`specops.backends.tensorflow.hessian`,
in a fresh process (so no trace is shared), side by side in one run:

- ``first H@v``: the first single-vector product (its traces and graph optimization);
- ``H@v``: the median of the products after it;
- ``first H@V``: the first block of ``k`` columns, then ``H@V`` its median after;
- ``traces``: the product functions' traces (``H.adapter.num_traces``) at the end;
- ``grad``: the median of one gradient over the data, for the ratio.

The engines' products are compared with each other (relative difference of ``H@V``).
``--old PATH`` adds a row for a checkout of specops at ``PATH`` (its ``specops`` package
importable from there), run with its defaults: the before/after figures of a change.

Run: ``python benchmarks/keras_tracing.py [--size 32] [--k 4] [--engines double_backward,forward_over_reverse]``
(about 5 minutes with both engines on one CPU core; ``forward_over_reverse`` traces for minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ENGINES = ("double_backward", "forward_over_reverse")


def measure(engine: str | None, size: int, k: int, repeats: int, out: str) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    from specops.backends import tensorflow as stf

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV3Small(input_shape=(size, size, 3), weights=None, classes=10,
                                                include_preprocessing=False, classifier_activation=None)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(13, size, size, 3)).astype("float32")
    Y = rng.integers(0, 10, 13)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    kwargs = {} if engine is None else {"engine": engine}
    t = time.perf_counter()
    H = stf.hessian(model, loss, [(X[:8], Y[:8]), (X[8:], Y[8:])], check_deterministic=False, **kwargs)
    construct = time.perf_counter() - t
    n = H.shape[0]
    v = tf.constant(rng.normal(size=n).astype("float32"))
    V = tf.constant(rng.normal(size=(n, k)).astype("float32"))

    def timed(fn):
        t = time.perf_counter()
        result = fn()
        np.asarray(result)
        return time.perf_counter() - t, result

    first_v, _ = timed(lambda: H @ v)
    later_v = float(np.median([timed(lambda: H @ v)[0] for _ in range(repeats)]))
    first_V, HV = timed(lambda: H @ V)
    later_V = float(np.median([timed(lambda: H @ V)[0] for _ in range(repeats)]))
    H.gradient()
    grad = float(np.median([timed(H.gradient)[0] for _ in range(repeats)]))
    np.save(out, np.asarray(HV))
    return {"engine": engine or "old default", "n": n, "construct": construct, "first_v": first_v,
            "later_v": later_v, "first_V": first_V, "later_V": later_V, "grad": grad,
            "traces": getattr(H.adapter, "num_traces", -1), "out": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--old", default=None, help="a checkout of specops to time with its defaults")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        engine, out = args.one.split(":", 1)
        print(json.dumps(measure(None if engine == "old" else engine, args.size, args.k, args.repeats, out)))
        return
    runs = [(e, None) for e in args.engines.split(",") if e] + ([("old", args.old)] if args.old else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine, path in runs:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            if path is not None:
                env["PYTHONPATH"] = os.path.abspath(path)
            cmd = [sys.executable, os.path.abspath(__file__), "--size", str(args.size), "--k", str(args.k),
                   "--repeats", str(args.repeats), "--one", f"{engine}:{os.path.join(tmp, engine)}.npy"]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=path or None)
            if done.returncode != 0:
                sys.exit(f"{engine} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        import numpy as np

        ref = np.load(rows[0]["out"])
        print(f"MobileNetV3Small {args.size}x{args.size}, batches 8 + 5, float32, n = {rows[0]['n']}, k = {args.k}")
        print(f"{'engine':22} {'first H@v s':>11} {'H@v s':>7} {'H@v/grad':>8} {'first H@V s':>11} "
              f"{'H@V s':>7} {'per col/grad':>12} {'traces':>6} {'vs first row':>12}")
        for r in rows:
            diff = np.linalg.norm(np.load(r["out"]) - ref) / np.linalg.norm(ref)
            print(f"{r['engine']:22} {r['first_v']:11.1f} {r['later_v']:7.3f} {r['later_v'] / r['grad']:8.2f} "
                  f"{r['first_V']:11.1f} {r['later_V']:7.3f} {r['later_V'] / args.k / r['grad']:12.2f} "
                  f"{r['traces']:6d} {diff:12.2e}")
        print("gradient: " + ", ".join(f"{r['grad']:.3f} s" for r in rows))


if __name__ == "__main__":
    main()
