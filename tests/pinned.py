"""python tests/pinned.py SCRIPT ARGS...: run a script of the repository as `python SCRIPT ARGS` would, at the
precision and layout that the test which started it states (tests/util.py: SSL_TEST_PRECISION, runs_at)."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import util  # noqa: E402,F401  (importing it pins the precision of this process)

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    runpy.run_path(sys.argv[0], run_name="__main__")
