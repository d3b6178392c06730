"""The project's structure: a method file plus common.py is all anyone needs to copy, so a method file imports only
the standard library, torch, torchvision, numpy, matplotlib, PIL and common (never another script of the project);
and every script's command line stops on bad input with one error line."""
import ast
import concurrent.futures
import glob
import json
import os
import subprocess
import sys

from util import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_FILES = ["simclr.py", "deepcluster.py", "moco.py", "byol.py", "dino.py", "rotnet.py", "cpc.py",
                "context_encoder.py"]  # context_encoder.py: where it exists
ALLOWED = set(sys.stdlib_module_names) | {"torch", "torchvision", "numpy", "matplotlib", "PIL", "common"}


def foreign_imports(path):
    """[(line, module)] of every import anywhere in the file (functions included) of a module that is not ALLOWED."""
    found = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))  # a relative import is foreign
    return [(line, name) for line, name in found if name.split(".")[0] not in ALLOWED]


def check_imports(paths):
    """Fails, naming each file, line and module, if any of the files imports a module that is not ALLOWED."""
    bad = {os.path.basename(p): found for p in paths if (found := foreign_imports(p))}
    assert not bad, ("a method file may import only the standard library, torch, torchvision, numpy, matplotlib, "
                     f"PIL and common; (line, module) found: {bad}")


def test_structure_method_files_import_only_common_and_libraries():
    paths = [os.path.join(ROOT, f) for f in METHOD_FILES if os.path.exists(os.path.join(ROOT, f))]
    assert len(paths) >= 7, paths
    check_imports(paths)


def test_structure_check_fails_on_an_import_of_another_script(tmp_path):
    good, bad = str(tmp_path / "good.py"), str(tmp_path / "bad.py")
    open(good, "w").write("import os\nimport torch.nn as nn\nfrom torch.utils.data import DataLoader\n"
                          "import common\nfrom common import fail\n\n\ndef f():\n    import matplotlib.pyplot as plt\n")
    open(bad, "w").write("import os\nimport simclr\n\n\ndef g():\n    from knn_eval import knn_monitor\n"
                         "    from . import visualize\n")
    check_imports([good])
    assert foreign_imports(bad) == [(2, "simclr"), (6, "knn_eval"), (7, ".")]
    try:
        check_imports([good, bad])
    except AssertionError as e:
        assert "bad.py" in str(e) and "simclr" in str(e) and "good.py" not in str(e), e
    else:
        raise AssertionError("an import of simclr passed the check")


def scripts():
    """Every script of the repository (the top-level .py files but common.py and test_all.py)."""
    return sorted({os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))} - {"common.py", "test_all.py"})


def module_level_problems(source):
    """[(line, statement)] of what would make a script do more than define things on import, or run more than main()
    as a program: any module-level statement but imports, definitions, assignments and the docstring, and a last
    statement other than `if __name__ == "__main__": main()`."""
    *body, last = ast.parse(source).body
    plain = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)
    found = [(n.lineno, ast.unparse(n)[:80]) for n in body
             if not (isinstance(n, plain) or (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)))]
    if ast.unparse(last) != "if __name__ == '__main__':\n    main()":
        found.append((last.lineno, ast.unparse(last)[:80]))
    return found


def test_every_script_runs_main_only_as_a_program():
    """Importing a script runs nothing, and its command line is its main() (so the in-process bad-input tests of
    main() are what a user gets). The check finds a call at module level and a missing guard."""
    assert not {name: found for name in scripts()
                if (found := module_level_problems(open(os.path.join(ROOT, name)).read()))}
    bad = "import torch\ntorch.set_num_threads(1)\n\n\ndef main():\n    pass\n\n\nmain()\n"
    assert module_level_problems(bad) == [(2, "torch.set_num_threads(1)"), (9, "main()")]


def test_every_script_stops_on_bad_input_with_one_error_line(tmp_path):
    """`python SCRIPT <bad input>` prints exactly one line, `error: ...`, on stderr (no traceback, no warning) and
    exits with status 1. Every script stops the same way, with SystemExit("error: ...") from its main(); each
    script's bad-input test checks its messages in-process, and the test above that main() is all its command line
    runs. Here, as a user would run them (each process is mostly Python importing torch, ~3 s, so one per kind of
    error, two at a time): the data path of common.py, a method's own flag check and an evaluation script's; and one
    process that imports every script prints nothing (no warning at import)."""
    d = str(tmp_path)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"epoch": 1, "loss": 1.0}) + "\n")  # an earlier run's log, which must stay as it is
    cases = [  # (command line, the stderr expected)
        (["simclr.py", "--data", "/no/such/folder", "--device", "cpu", "--out", d],
         "error: dataset folder not found: /no/such/folder"),
        (["byol.py", "--ema", "2", "--device", "cpu", "--out", d], "error: --ema must be in [0, 1] (got 2.0)"),
        (["knn_eval.py", "--ckpt", os.path.join(d, "missing.pt"), "--device", "cpu"],
         f"error: checkpoint not found: {os.path.join(d, 'missing.pt')}"),
    ]
    imports = "import " + ", ".join(name[:-3] for name in scripts())
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        silent = pool.submit(subprocess.run, [sys.executable, "-W", "default", "-c", imports], cwd=ROOT,
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        results = list(pool.map(lambda case: run_script(*case[0], env={"OMP_NUM_THREADS": "1"}), cases))
    for (argv, expected), r in zip(cases, results):
        assert r.returncode == 1, (argv, r.returncode, r.stderr[-2000:])
        assert r.stderr.strip() == expected, (argv, r.stderr[-2000:])
    assert os.listdir(d) == ["metrics.jsonl"]  # nothing written into the --out folder (common.RunLog.begin)
    r = silent.result()
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (imports, r.stdout[-1000:], r.stderr[-2000:])
