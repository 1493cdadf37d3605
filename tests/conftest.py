import os
import sys

import pytest
import torch

# Tests are small; one thread avoids oversubscribing the 2-core CI machine and keeps runs deterministic.
torch.set_num_threads(1)

SHARED_DATA = os.environ.get("SEQGEN_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture
def shared_data():
    """Path of ../shared/data (or $SEQGEN_DATA); slow tests skip cleanly when it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"real data not found at {SHARED_DATA} (set SEQGEN_DATA)")
    return SHARED_DATA


def run_cli(*args, check=True, timeout=300, env=None):
    """Run `python -m seqgen.cli ARGS` in a subprocess; returns CompletedProcess."""
    import subprocess
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "seqgen.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"seqgen {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc
