"""Helpers shared by the test modules (not tests themselves), and the precision and layout every test runs at."""
import contextlib
import functools
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, HERE)
import common  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# Precision and memory layout. `--amp auto` and `--channels-last auto` choose differently on each CPU (bf16 and
# channels_last where the CPU has native bf16 / AVX-512, fp32 and NCHW on an AVX2-only CPU), so a margin measured
# on one CPU would not hold on another. Every test therefore STATES its precision and layout: fp32 and NCHW unless
# it is decorated with @runs_at(amp=..., channels_last=...). test_all.py and tests/conftest.py run each test inside
# pinned(test): there `auto` resolves to the stated setting on every CPU, and anything that resolves to another
# precision or layout (an explicit `--amp bf16` in an fp32 test, say) fails the test with an AssertionError.
# Processes a test starts (run_script, torchrun(), mp.spawn) inherit the statement through SSL_TEST_PRECISION and
# pin themselves when they import this module.
# ----------------------------------------------------------------------------------------------------------------
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16}
LAYOUTS = {"off": torch.contiguous_format, "on": torch.channels_last}
PRECISION_ENV = "SSL_TEST_PRECISION"


def runs_at(amp="off", channels_last="off"):
    """Decorator: the precision (--amp off | bf16) and layout (--channels-last off | on) the test runs at.
    runs_at(None) is for the tests of the `auto` rules themselves: nothing is pinned or checked there."""
    assert amp is None or (amp in AMP_DTYPES and channels_last in LAYOUTS), (amp, channels_last)

    def mark(fn):
        fn.precision = None if amp is None else (amp, channels_last)
        return fn
    return mark


def stated_precision(fn):
    """What a test states: its @runs_at, else fp32 and NCHW."""
    return getattr(fn, "precision", ("off", "off"))


_REAL = {"setup_amp": common.setup_amp, "memory_format": common.memory_format}


def _pinned_setup_amp(amp, channels_last):
    @functools.wraps(_REAL["setup_amp"])
    def setup_amp(requested, device):
        autocast, scaler = _REAL["setup_amp"](amp if requested == "auto" else requested, device)
        assert autocast.dtype == AMP_DTYPES[amp], (f"this test states --amp {amp} but ran --amp {requested}, which "
                                                   f"resolved to {autocast.dtype or 'fp32'} (tests/util.py runs_at)")
        return autocast, scaler

    @functools.wraps(_REAL["memory_format"])
    def memory_format(device, requested="auto"):
        got = _REAL["memory_format"](device, channels_last if requested == "auto" else requested)
        assert got == LAYOUTS[channels_last], (f"this test states --channels-last {channels_last} but ran "
                                               f"--channels-last {requested}, which resolved to {got} "
                                               "(tests/util.py runs_at)")
        return got
    return setup_amp, memory_format


@contextlib.contextmanager
def precision(amp="off", channels_last="off"):
    """Run the body at this precision and layout (pinned and checked, in this process and the ones it starts)."""
    saved = common.setup_amp, common.memory_format, os.environ.get(PRECISION_ENV)
    common.setup_amp, common.memory_format = _pinned_setup_amp(amp, channels_last)
    os.environ[PRECISION_ENV] = f"{amp},{channels_last}"
    try:
        yield
    finally:
        common.setup_amp, common.memory_format = saved[:2]
        if saved[2] is None:
            os.environ.pop(PRECISION_ENV, None)
        else:
            os.environ[PRECISION_ENV] = saved[2]


@contextlib.contextmanager
def pinned(fn):
    """Around a whole test (test_all.py, conftest.py): the precision and layout the test states."""
    stated = stated_precision(fn)
    if stated is None:
        yield
    else:
        with precision(*stated):
            yield


if os.environ.get(PRECISION_ENV) and common.setup_amp is _REAL["setup_amp"]:  # a process started by a test
    common.setup_amp, common.memory_format = _pinned_setup_amp(*os.environ[PRECISION_ENV].split(","))


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


PINNED = os.path.join(HERE, "tests", "pinned.py")  # runs a script at the stated precision (see above)


def run_script(*args, timeout=600, env=None):
    """python SCRIPT ARGS in the repository root, at the precision and layout the calling test states."""
    return subprocess.run([sys.executable, PINNED, *args], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def torchrun(nproc, *args, timeout=600):
    """torchrun --nproc_per_node=N SCRIPT ARGS on the CPU (gloo), at the precision the calling test states."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                           "--master_port", str(free_port()), PINNED, *args], cwd=HERE, capture_output=True,
                          text=True, timeout=timeout)


def torchrun_workers(nproc, *args, timeout=600):
    """What torchrun --nproc_per_node=N SCRIPT ARGS starts on one machine, without the launcher process (which costs
    a test ~3 s of importing torch): N processes of SCRIPT with torchrun's environment (RANK, LOCAL_RANK,
    WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS=1), at the stated precision. If a rank
    fails, the others are stopped (as torchrun does). Returns a CompletedProcess: the first non-zero exit status
    (or 0), rank 0's stdout, every rank's stderr. test_simclr.py runs the real torchrun."""
    port, procs = str(free_port()), []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        files = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # (a full pipe would block a rank)
        procs.append((subprocess.Popen([sys.executable, PINNED, *args], cwd=HERE, env=env, text=True,
                                       stdout=files[0], stderr=files[1]), files))
    deadline, codes = time.time() + timeout, [None] * nproc
    while None in codes and time.time() < deadline:
        codes = [p.poll() for p, _ in procs]
        if any(c not in (None, 0) for c in codes):
            break
        time.sleep(0.05)
    outs = []
    for p, files in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        outs.append([f.seek(0) or f.read() for f in files])
        for f in files:
            f.close()
    codes = [p.returncode for p, _ in procs]
    return subprocess.CompletedProcess(args, next((c for c in codes if c), 0), outs[0][0], "".join(e for _, e in outs))


def random_init_knn(data, backbone="resnet18", seed=0, **kw):
    torch.manual_seed(seed)
    enc = common.build_backbone(backbone, **kw)
    return common.knn_monitor(enc, data, torch.device("cpu"))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
