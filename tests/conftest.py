"""Settings for the whole suite.

``make test`` runs the suite in two worker processes (pytest-xdist, one file per worker at a time). Two
workers that each ran torch's and ONNX Runtime's default two threads on a two-core machine would spin against
each other, so each worker (and every process it starts: the CLI and example tests run subprocesses) uses one
thread. A single-process run (``pytest`` without ``-n``) keeps the defaults.
"""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["QEXPORT_THREADS"] = "1"

    import torch

    torch.set_num_threads(1)
