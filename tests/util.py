"""Helpers shared by the test modules (not tests themselves)."""
import os
import socket
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, HERE)
import common  # noqa: E402
import knn_eval  # noqa: E402


def tmpdir():
    return tempfile.mkdtemp(prefix="ssl-test-")


def expect_exit(fn, *words):
    """fn() must stop with SystemExit whose one-line message contains every word."""
    try:
        fn()
    except SystemExit as e:
        msg = str(e.code)
        assert "\n" not in msg and msg.startswith("error:"), msg
        for w in words:
            assert w in msg, f"{w!r} not in {msg!r}"
        return msg
    raise AssertionError("expected SystemExit")


def run_script(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def random_init_knn(data, backbone="resnet18", seed=0, **kw):
    torch.manual_seed(seed)
    enc = common.build_backbone(backbone, **kw)
    return knn_eval.knn_monitor(enc, data, torch.device("cpu"))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
