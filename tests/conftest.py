import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from gpu_pipeline.cli import CHUNKED_FIXED

#: The real images with ground truth: ``shared/data`` beside the checkout, or where DECLUMP_SHARED_DATA says.
SHARED_DATA = Path(os.environ.get("DECLUMP_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
#: The chunked engine's defaults: it takes no 'auto' (those options measure the whole image at once), but the
#: values of ``cli.CHUNKED_FIXED``, no size beyond the peak window's, no annotation rejection, and the
#: threshold's outlines. The in-memory ``separate`` with these gives the chunked run's bytes (``from conftest
#: import CHUNKED_DEFAULTS``).
CHUNKED_DEFAULTS = {**{name: value for name, _, value in CHUNKED_FIXED}, "min_size": None,
                    "reject_annotations": False, "outline": "threshold"}


@pytest.fixture
def rng(request):
    """Random data per test: seeded from the test's id, varied with DECLUMP_TEST_SEED=<int>."""
    seed = zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("DECLUMP_TEST_SEED", "0"))
    return np.random.default_rng(seed)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.exists():
        pytest.skip(f"real test data not found at {SHARED_DATA} (the shared/data folder beside the checkout; "
                    "DECLUMP_SHARED_DATA=FOLDER points elsewhere)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cluster_client():
    """A real dask.distributed LocalCluster: 2 worker processes, 1 thread each."""
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()
