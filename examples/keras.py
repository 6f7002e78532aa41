"""The Hessian spectrum of a Keras model: top eigenvalues, trace, density, per-layer blocks.

A small Keras MLP on scikit-learn's digits, trained for a few epochs with
``model.fit``, then analysed with specops in float64. The data go in as a
``tf.data.Dataset`` (not reshuffled: the Hessian must be the same matrix at every
product). The model's weights are the same before and after.

Run:  python examples/keras.py
"""

import os
import sys

# Run as a script, this file's folder comes first on sys.path and this file would
# shadow the keras package it imports.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

import specops
from specops.backends import tensorflow as stf
from specops.zoo.data import digits

keras.config.set_floatx("float64")  # model, loss and products in float64


def main():
    keras.utils.set_random_seed(0)
    X, y = digits(n=1024)
    X = X.reshape(len(X), -1).astype(np.float64)
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(32, activation="tanh", name="hidden"),
        keras.layers.Dense(10, name="out"),
    ])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    model.fit(X, y, epochs=20, batch_size=128, verbose=0)

    data = tf.data.Dataset.from_tensor_slices((X, y)).batch(256)
    H = stf.hessian(model, loss, data)
    print(f"{H.num_params} parameters in blocks {list(H.param_blocks)}; loss {H.loss_at():.4f}")

    top = specops.eigsh(H, k=3, which="LA", tol=1e-8, seed=0)
    print("top eigenvalues:", np.round(top.eigenvalues, 6), "converged:", top.converged.all())
    tr = specops.trace(H, max_matvecs=60, seed=0)
    print(f"trace: {tr.estimate:.4f} +- {tr.stderr:.4f}")
    density = specops.spectral_density(H, num_probes=4, num_steps=48, seed=0)
    grid = density.default_grid()
    values = density.evaluate(grid)
    print(f"spectral density on [{grid[0]:.3g}, {grid[-1]:.3g}], highest at {grid[values.argmax()]:.3g}")

    for name in ("sequential/hidden/*", "sequential/out/*"):
        block = specops.eigsh(H.restrict(name), k=1, tol=1e-8, seed=0)
        print(f"top eigenvalue of the {name!r} block: {block.eigenvalues[0]:.6f}")


if __name__ == "__main__":
    main()
