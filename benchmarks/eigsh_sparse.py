"""Top eigenvalue of a sparse operator: Lanczos vs deflated power iteration vs ARPACK.

Counts products and wall time to reach a 1e-6 relative residual on the top eigenvalue,
on one sparse symmetric operator (n = 100,000), side by side in one run. Prints a
Markdown table of medians over repeats.

    OMP_NUM_THREADS=1 python benchmarks/eigsh_sparse.py [--n 100000] [--repeats 5]

Goal (issue 2): Lanczos needs at most a third of the power iteration's products and is
within 1.5x of ARPACK's wall time.
"""

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import scipy
import scipy.sparse as sp
import scipy.sparse.linalg as spl

import specops as so


def operator(n, seed=0):
    """A bulk spectrum in [0, 1], a few separated outliers, and sparse symmetric coupling."""
    rng = np.random.default_rng(seed)
    diag = np.concatenate([rng.uniform(0, 1, n - 6), [3.0, 2.8, 2.6, 2.5, 2.2, 2.0]])
    m = 2 * n
    noise = sp.csr_matrix((rng.uniform(-0.05, 0.05, m), (rng.integers(0, n, m), rng.integers(0, n, m))),
                          shape=(n, n))
    return (sp.diags(diag) + noise + noise.T).tocsr()


class Counted(spl.LinearOperator):
    def __init__(self, M):
        super().__init__(M.dtype, M.shape)
        self.M, self.count = M, 0

    def _matvec(self, x):
        self.count += 1
        return self.M @ x

    def _matmat(self, X):
        self.count += X.shape[1]
        return self.M @ X


def relative_residual(M, lam, v):
    v = np.asarray(v).ravel()
    v = v / np.linalg.norm(v)
    return np.linalg.norm(M @ v - lam * v) / abs(lam)


def run(name, M, tol):
    A = Counted(M)
    t0 = time.perf_counter()
    if name == "arpack":
        vals, vecs = spl.eigsh(A, k=1, which="LA", tol=tol, v0=np.ones(M.shape[0]))
        lam, v = vals[0], vecs[:, 0]
    else:
        r = so.eigsh(A, k=1, which="LA", method=name, tol=tol, max_matvecs=100_000)
        lam, v = r.eigenvalues[0], r.eigenvectors[:, 0]
    return time.perf_counter() - t0, A.count, lam, relative_residual(M, lam, v)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tol", type=float, default=1e-6)
    args = p.parse_args()
    M = operator(args.n)
    rows = {}
    for _ in range(args.repeats):  # interleaved, so machine noise hits all methods alike
        for name in ("lanczos", "power", "arpack"):
            rows.setdefault(name, []).append(run(name, M, args.tol))
    print(f"n = {args.n}, nnz = {M.nnz}, tol = {args.tol:g}, OMP_NUM_THREADS = {os.environ['OMP_NUM_THREADS']}, "
          f"{platform.processor() or platform.machine()}, numpy {np.__version__}, scipy {scipy.__version__}, "
          f"specops {so.__version__}; medians of {args.repeats} runs\n")
    base = np.median([r[0] for r in rows["lanczos"]])
    base_mv = rows["lanczos"][0][1]
    print("| method | products | products / Lanczos | wall time (ms) | time / Lanczos | top eigenvalue | rel. residual |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in rows.items():
        t = np.median([r[0] for r in rs])
        _, mv, lam, res = rs[0]
        print(f"| {name} | {mv} | {mv / base_mv:.2f} | {1e3 * t:.1f} | {t / base:.2f} | {lam:.10f} | {res:.1e} |")


if __name__ == "__main__":
    main()
