"""Layout: the inference side never imports training code, and the package has no import circles."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "platemask"
# what the container, the CLI's mask command and the DAG workers load
INFERENCE = ["platemask.segment", "platemask.serve", "platemask.pipeline", "platemask.runs", "platemask.runspec",
             "platemask.layout", "platemask.storage", "platemask.verify", "platemask.sagemaker_backend", "platemask.mask",
             "platemask.imageio"]


@pytest.mark.parametrize("module", INFERENCE)
def test_inference_modules_do_not_import_training(module):
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "bad = sorted(m for m in sys.modules if m.startswith('platemask.training')); "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{module} pulls in training modules: {proc.stdout.strip()} {proc.stderr[-2000:]}"


def _imports(path: Path) -> set[str]:
    """platemask modules a file imports, at module level or inside functions."""
    mod = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    pkg = mod.rsplit(".", 1)[0] if path.name != "__init__.py" else mod
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target + "." + a.name for a in node.names]
            for t in [target, *names]:
                if t.startswith("platemask") and (PKG.parent / (t.replace(".", "/") + ".py")).is_file():
                    out.add(t)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("platemask.")}
    out.discard(mod)
    return out


def test_no_import_circles():
    graph = {".".join(p.relative_to(PKG.parent).with_suffix("").parts): _imports(p) for p in PKG.rglob("*.py")}
    seen, stack, cycles = set(), [], []

    def visit(n):
        if n in stack:
            cycles.append(stack[stack.index(n):] + [n])
            return
        if n in seen:
            return
        seen.add(n)
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            visit(m)
        stack.pop()

    for n in sorted(graph):
        visit(n)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


S3_OBJECT_APIS = {"get_object", "put_object", "delete_object", "delete_objects", "head_object", "copy_object",
                  "get_paginator", "list_objects", "list_objects_v2", "upload_file", "upload_fileobj", "download_file",
                  "download_fileobj"}
# storage.py is the storage layer; demo.py and local_transform.py play S3/SageMaker themselves (a local
# stand-in for the cloud side, not the nightly path)
S3_ALLOWED = {"platemask/storage.py", "platemask/demo.py", "platemask/local_transform.py"}


def _s3_calls(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            if name in S3_OBJECT_APIS:
                out.append(f"{path.name}:{node.lineno} .{name}()")
            elif (name == "client" and isinstance(node.func.value, ast.Name) and node.func.value.id == "boto3"
                  and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "s3"):
                out.append(f"{path.name}:{node.lineno} boto3.client('s3')")
    return out


def test_only_the_storage_layer_calls_s3_object_apis():
    """The nightly path (runs, QA, reports, SageMaker, the DAG and the QA view) reaches S3 objects only
    through ``platemask.storage``, so a new storage backend is one file. The Airflow S3 client factory
    (``airflow_support.s3_client``, an S3Hook connection) hands the client over and calls no object API."""
    root = PKG.parent
    files = [*PKG.rglob("*.py"), *(root / "dags").rglob("*.py"), *(root / "plugins").rglob("*.py")]
    found = [c for p in files if p.relative_to(root).as_posix() not in S3_ALLOWED for c in _s3_calls(p)]
    assert not found, "direct S3 object calls outside platemask/storage.py: " + ", ".join(found)
