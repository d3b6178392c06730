"""Every test of the project (the modules in tests/). Runs on a CPU in minutes, offline, on data the tests make.

    python test_all.py                 # ends with "N passed, N failed"; exit status 1 if any failed
    python test_all.py nt_xent resume  # only tests whose name (or module) contains one of these words
    python -m pytest tests             # the same tests under pytest

Every test runs at the precision and memory layout it states (fp32 and NCHW unless it says otherwise), on every
CPU: see `runs_at` in tests/util.py. The ten slowest tests are listed at the end.
"""
import glob
import importlib
import inspect
import os
import pathlib
import shutil
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "tests")]

import torch  # noqa: E402
import util  # noqa: E402  (tests/util.py)

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))


def collect(words):
    """(module, name, function) of every test_* function of tests/test_*.py, in file order."""
    tests = []
    for path in sorted(glob.glob(os.path.join(HERE, "tests", "test_*.py"))):
        mod = importlib.import_module(os.path.basename(path)[:-3])
        for name, fn in vars(mod).items():
            if name.startswith("test_") and inspect.isfunction(fn) and fn.__module__ == mod.__name__ and \
                    (not words or any(w in name or w in mod.__name__ for w in words)):
                tests.append((mod.__name__, name, fn))
    return tests


def run(fn):
    """Call a test at the precision and layout it states; a `tmp_path` argument (as in pytest) gets a fresh folder
    that is deleted afterwards."""
    with util.pinned(fn):
        if "tmp_path" not in inspect.signature(fn).parameters:
            return fn()
        d = tempfile.mkdtemp(prefix="ssl-test-")
        try:
            return fn(tmp_path=pathlib.Path(d))
        finally:
            shutil.rmtree(d, ignore_errors=True)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "unknown CPU"


def main():
    tests = collect(sys.argv[1:])
    passed = failed = 0
    t_all, times = time.time(), []
    for module, name, fn in tests:
        t0 = time.time()
        try:
            run(fn)
            passed += 1
            print(f"PASS {module}.{name} ({time.time() - t0:.1f}s)", flush=True)
        except BaseException:  # noqa: B036 (SystemExit from a script is a failure too)
            if sys.exc_info()[0] is KeyboardInterrupt:
                raise
            failed += 1
            print(f"FAIL {module}.{name} ({time.time() - t0:.1f}s)\n{traceback.format_exc()}", flush=True)
        times.append((time.time() - t0, f"{module}.{name}"))
    print("slowest tests:")
    for seconds, name in sorted(times, reverse=True)[:10]:
        print(f"  {seconds:6.1f}s  {name}")
    print(f"total {time.time() - t_all:.0f}s on {torch.get_num_threads()} thread(s), {cpu_name()}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
