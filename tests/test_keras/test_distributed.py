"""tf.distribute.MirroredStrategy over two logical CPUs trains DOConv2D like one device."""

import json
import os
import subprocess
import sys

import pytest

from kutils import tf_only


@tf_only
@pytest.mark.slow
def test_mirrored_strategy_matches_single_device():
    script = os.path.join(os.path.dirname(__file__), "_mirrored.py")
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["shapes"][:3] == [[11, 2, 6], [4, 9, 11], [6]]  # W, D, bias of layer 1
    assert result["min_moved"] > 1e-4  # every weight trained
    assert result["max_diff"] < 1e-5  # float32 reduction order differs between the two
