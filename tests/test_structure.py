"""The project's structure: a method file plus common.py is all anyone needs to copy, so a method file imports only
the standard library, torch, torchvision, numpy, matplotlib, PIL and common (never another script of the project);
and every script's command line stops on bad input with one error line."""
import ast
import concurrent.futures
import glob
import json
import os
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


def test_every_script_stops_on_bad_input_with_one_error_line(tmp_path):
    """`python SCRIPT <bad input>` prints exactly one line, `error: ...`, on stderr (no traceback, no warning) and
    exits with status 1, for every script of the repository. Each script's own bad-input test checks its many
    messages in-process (SystemExit with a one-line message); this test runs one case per script as a user would,
    two processes at a time (each is mostly Python importing torch)."""
    d = str(tmp_path)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"epoch": 1, "loss": 1.0}) + "\n")  # a run without deepcluster's NMI values
    folder = ["--data", "/no/such/folder", "--device", "cpu", "--out", d]
    no_folder = "error: dataset folder not found: /no/such/folder"
    cases = [  # (command line, the stderr expected, or its start when it ends with "...")
        (["simclr.py", *folder], no_folder),
        (["moco.py", *folder], no_folder),
        (["cpc.py", *folder], no_folder),
        (["rotnet.py", *folder], no_folder),
        (["deepcluster.py", *folder], no_folder),
        (["context_encoder.py", *folder], no_folder),
        (["bench_pipeline.py", *folder], no_folder),
        (["byol.py", "--ema", "2", "--device", "cpu", "--out", d], "error: --ema must be in [0, 1] (got 2.0)"),
        (["dino.py", "--data", "shapes", "--student-temp", "-1", "--device", "cpu", "--out", d],
         "error: --student-temp, --teacher-temp and --warmup-teacher-temp must be > 0"),
        (["imagenet_mnist.py", "--digits", "5", "--device", "cpu", "--out", d],
         "error: --digits needs at least two different classes from 0-9, got [5]"),
        (["knn_eval.py", "--ckpt", os.path.join(d, "missing.pt"), "--device", "cpu"],
         f"error: checkpoint not found: {os.path.join(d, 'missing.pt')}"),
        (["visualize.py", "deepcluster-nmi", "--run", d, "--out", d],
         f"error: {d} has no NMI values (nmi_prev, nmi_labels: a deepcluster.py run's metrics)"),
    ]
    scripts = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))} - {"common.py", "test_all.py"}
    assert scripts <= {argv[0] for argv, _ in cases}, f"scripts without a case here: {scripts - {a[0] for a, _ in cases}}"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: run_script(*case[0], env={"OMP_NUM_THREADS": "1"}), cases))
    for (argv, expected), r in zip(cases, results):
        assert r.returncode == 1, (argv, r.returncode, r.stderr[-2000:])
        assert r.stderr.strip() == expected, (argv, r.stderr[-2000:])
    assert os.listdir(d) == ["metrics.jsonl"]  # nothing written into the --out folder (common.RunLog.begin)
