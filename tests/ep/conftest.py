import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for one test module (8 logical CPUs: actors take fractions of them)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
