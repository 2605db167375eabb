"""A local Ray cluster shared by the test modules of one test process (one per pytest-xdist worker)."""

from __future__ import annotations

import pytest

# logical GPUs: a study takes the --gpus it asks for (TrialPool uses the smaller of --gpus and the cluster's)
RAY_GPUS = 8


@pytest.fixture(scope="session")
def _ray_until_the_end():
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def local_ray(_ray_until_the_end):
    """Ray with 8 logical GPUs. Its start costs 5 to 10 s on 2 cores, so a module finds the one an earlier
    module started; it starts again only where a test shut it down or a study started a smaller one."""
    import ray

    from tuner.runner.pool import init_ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= RAY_GPUS:
        return
    ray.shutdown()
    init_ray(None, gpus=RAY_GPUS)
