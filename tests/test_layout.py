"""The code's shape, checked: dependencies point one way (training → export → engine), tensor
names live in the contract alone, functions stay readable, the package list is complete, and the
engine's public surface imports."""
import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("v2t_engine", "training", "export")
MAX_FUNCTION_LINES = 80


def python_files(*folders):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_engine_never_imports_training_or_export():
    """Not even lazily, and not by a string handed to importlib: commands and backends that need
    torch register themselves as entry points instead."""
    offenders = [f"{f.relative_to(ROOT)}:{n}" for f in python_files("v2t_engine")
                 for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
                 if re.search(r"v2t_training|v2t_export", line)]
    assert not offenders


def test_tensor_names_are_spelled_only_in_the_contract():
    from v2t_engine.runtime import contract

    names = {v for k, v in vars(contract).items() if k.isupper() and isinstance(v, str) and "_FILE" not in k}
    names -= {contract.NORMAL, contract.TOKENS, contract.POSITIONS, contract.PIXELS}  # fill kinds
    names -= {contract.BATCH, contract.NUM_FRAMES, contract.PREFIX_LEN, contract.CACHE_LEN}  # axis names
    assert {"input_ids", "frames", "logits"} <= names
    # Not tensor names: the HTTP API's JSON field "frames" (issue 14), spelled once.
    elsewhere = {("v2t_engine/serve/requests.py", "frames")}
    found = []
    for f in python_files(*STAGES):
        if f.name == "contract.py":
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                    node.value in names or node.value.startswith(("cache.", "kv_out."))) and (
                    (str(f.relative_to(ROOT)), node.value) not in elsewhere):
                found.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not found


def test_no_function_is_longer_than_80_lines():
    long = []
    for f in python_files(*STAGES):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long


def test_every_package_folder_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    folder_of = {name: folder for name, folder in config["package-dir"].items()}
    found = set()
    for name, folder in folder_of.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == set(config["packages"])


def test_public_surface_imports_lazily():
    code = ("import sys, v2t_engine; assert 'v2t_engine.runtime.captioner' not in sys.modules; "
            "from v2t_engine import Captioner, SearchOptions, CaptionGenerator, V2TError; "
            "assert 'torch' not in sys.modules; "
            "[getattr(v2t_engine, n) for n in v2t_engine.__all__]")
    subprocess.run([sys.executable, "-c", code], check=True)
    import v2t_engine

    with pytest.raises(AttributeError):
        v2t_engine.no_such_name  # noqa: B018
