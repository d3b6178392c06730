"""The project's structure: a method file plus common.py is all anyone needs to copy, so a method file imports only
the standard library, torch, torchvision, numpy, matplotlib, PIL and common (never another script of the project)."""
import ast
import os
import sys

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
