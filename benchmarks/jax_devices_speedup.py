"""Speed-up of JAX Hessian-vector products split over the devices of one process: ResNet-20 on 1,024 samples.

Run ``python benchmarks/jax_devices_speedup.py``: for each D of ``--devices`` (default 1, 2
and 4) it starts a process that sees D CPU devices, one thread each
(``XLA_FLAGS=--xla_force_host_platform_device_count=D --xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1``), builds ``specops.backends.jax.hessian(...,
devices="local")`` of a ResNet-20 written in plain JAX over 1,024 random CIFAR-shaped
samples in batches of 128, times ``--reps`` products ``H @ v`` and prints the medians:

    devices  median s/HVP  speed-up  efficiency

The network is that of ``specops.zoo.torch_resnet`` (3x3 stem, three stages of three
basic blocks with 16/32/64 channels, strided 1x1 shortcuts, global average pooling, a
linear head) with batch norm in inference form, a per-channel scale and shift:
272,474 parameters like the PyTorch model in eval mode. On a GPU machine,
``--platform gpu`` splits over the visible GPUs instead (no forced devices).

Options: ``--samples``, ``--batch-size``, ``--reps``, ``--devices 1,2,4``,
``--platform cpu|gpu``, ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--devices", default="1,2,4", help="comma-separated device counts")
    p.add_argument("--platform", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--json", default=None, help="write all timings here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON output of one run
    p.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resnet20(key, width=16, classes=10):
    """Parameters of a CIFAR ResNet-20 (NHWC convolutions; batch norm as scale and shift)."""
    import jax
    import jax.numpy as jnp

    keys = iter(jax.random.split(key, 64))

    def conv(k, cin, cout):
        return jax.random.normal(next(keys), (k, k, cin, cout)) * (2.0 / (k * k * cin)) ** 0.5

    def norm(c):
        return {"scale": jnp.ones(c), "shift": jnp.zeros(c)}

    params = {"stem": {"conv": conv(3, 3, width), "bn": norm(width)}, "stages": []}
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        blocks = []
        for b in range(3):
            stride = 2 if stage > 0 and b == 0 else 1
            block = {"conv1": conv(3, cin, cout), "bn1": norm(cout), "conv2": conv(3, cout, cout), "bn2": norm(cout)}
            if stride != 1 or cin != cout:
                block["short"], block["bn_short"] = conv(1, cin, cout), norm(cout)
            blocks.append(block)
            cin = cout
        params["stages"].append(blocks)
    params["head"] = {"w": jax.random.normal(next(keys), (cin, classes)) / cin ** 0.5, "b": jnp.zeros(classes)}
    return params


def forward(params, x):
    import jax
    import jax.numpy as jnp

    def conv(x, w, stride=1):
        pad = "SAME" if w.shape[0] == 3 else "VALID"
        return jax.lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def bn(x, p):
        return x * p["scale"] + p["shift"]

    x = jax.nn.relu(bn(conv(x, params["stem"]["conv"]), params["stem"]["bn"]))
    for stage, blocks in enumerate(params["stages"]):
        for b, p in enumerate(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            y = jax.nn.relu(bn(conv(x, p["conv1"], stride), p["bn1"]))
            y = bn(conv(y, p["conv2"]), p["bn2"])
            short = bn(conv(x, p["short"], stride), p["bn_short"]) if "short" in p else x
            x = jax.nn.relu(y + short)
    x = jnp.mean(x, axis=(1, 2))
    return x @ params["head"]["w"] + params["head"]["b"]


def worker(args):
    import jax
    import jax.numpy as jnp

    from specops.backends.jax import hessian

    params = resnet20(jax.random.PRNGKey(0))
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    images = jax.random.normal(kx, (args.samples, 32, 32, 3))
    labels = jax.random.randint(ky, (args.samples,), 0, 10)
    batches = [(images[i:i + args.batch_size], labels[i:i + args.batch_size])
               for i in range(0, args.samples, args.batch_size)]

    def loss(p, batch):
        x, y = batch
        return -jnp.mean(jax.nn.log_softmax(forward(p, x))[jnp.arange(len(y)), y])

    devices = jax.local_devices(backend=args.platform)[: args.count]
    H = hessian(loss, params, batches, devices=devices if args.count > 1 else None, check_deterministic=False)
    v = H.ops.random(H.shape[0], [0], seed=0, distribution="normal")[:, 0]
    (H @ v).block_until_ready()  # compile
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        (H @ v).block_until_ready()
        times.append(time.perf_counter() - t0)
    with open(args.worker, "w") as f:
        json.dump({"devices": len(devices), "n": int(H.shape[0]), "hvp_s": times, "engine": H.engine,
                   "mesh": repr(H.adapter.mesh), "load_average": os.getloadavg()}, f)


def run(args, count: int, out: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if args.platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={count} --xla_cpu_multi_thread_eigen=false "
                            "intra_op_parallelism_threads=1")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", out, "--count", str(count), "--platform",
           args.platform, "--samples", str(args.samples), "--batch-size", str(args.batch_size),
           "--reps", str(args.reps)]
    subprocess.run(cmd, check=True, env=env)
    with open(out) as f:
        return json.load(f)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(args, d, os.path.join(tmp, f"d{d}.json")) for d in map(int, args.devices.split(","))]
    base = statistics.median(results[0]["hvp_s"]) * results[0]["devices"]
    print(f"JAX ResNet-20, n = {results[0]['n']:,} parameters, {args.samples} samples in batches of "
          f"{args.batch_size}, {args.platform}, one thread per device, {args.reps} products")
    print(f"{'devices':>7}  {'median s/HVP':>12}  {'speed-up':>8}  {'efficiency':>10}  load average")
    for r in results:
        t = statistics.median(r["hvp_s"])
        print(f"{r['devices']:>7}  {t:>12.3f}  {base / t:>8.2f}  {base / t / r['devices']:>10.0%}  "
              f"{r['load_average'][0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
