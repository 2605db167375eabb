"""Trials on Ray actors, their servers and their clean-up."""

import os

RAY_LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode, on the loopback only


def ray_local_only() -> None:
    """Before Ray is imported (it reads this at import): a cluster started here binds 127.0.0.1 only.
    Not for a process that joins a cluster with --ray-address."""
    os.environ.setdefault(RAY_LOCAL_ONLY, "0")
