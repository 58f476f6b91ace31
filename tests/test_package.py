"""Packaging: lean import, installed sub-packages, console script, entry points."""

import subprocess
import sys


def _py(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_import_is_lean(tmp_path):
    p = _py(
        "import sys, qexport\n"
        "heavy = [m for m in ('transformers', 'onnx', 'onnxruntime', 'triton', 'tensorrt') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized()\n",
        tmp_path,
    )
    assert p.returncode == 0, p.stderr


def test_subpackages_install_under_qexport_only(tmp_path):
    p = _py(
        "import importlib.util, qexport.passes, qexport.kernels.reference as r\n"
        "assert importlib.util.find_spec('passes') is None and importlib.util.find_spec('kernels') is None\n"
        "print(r.__file__)\n",
        tmp_path,  # outside the repository, so the top-level folders are not on sys.path
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().replace("\\", "/").endswith("kernels/reference.py")


def test_console_script_runs():
    exe = __import__("shutil").which("qexport") or str(__import__("pathlib").Path(sys.executable).with_name("qexport"))
    p = subprocess.run([exe, "recipes"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "w4g128" in p.stdout
