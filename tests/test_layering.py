"""The package's layers, kept by reading its imports: cli -> commands -> export | quantize -> runtime ->
bundle, with rewrites (onnx only) shared by export and quantize. Any import counts, also one inside a
function: a lazy import is still a dependency."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import onnxlm

PACKAGE = Path(onnxlm.__file__).parent


def imports_of(source: str, module: str) -> set[str]:
    """Absolute names of every module `source` (the module `module`, e.g. onnxlm.runtime.engine) imports."""
    package = module.split(".")
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.add(name)
            if not node.module:  # `from . import x`: x is a module
                out.update(f"{name}.{a.name}" for a in node.names)
    return out


def package_imports() -> dict[str, set[str]]:
    """Module name -> what it imports, over every file of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        # a package's own __init__ resolves relative imports against itself
        name = module + ".__init__" if parts[-1] == "__init__" else module
        out[module] = imports_of(path.read_text(encoding="utf-8"), name)
    return out


def offenders(modules: dict[str, set[str]], where: str, banned: tuple[str, ...], but: str = "@") -> list[str]:
    return sorted(
        f"{m} imports {i}"
        for m, found in modules.items()
        if (m == where or m.startswith(where + ".")) and not m.startswith(but)
        for i in found
        if any(i == b or i.startswith(b + ".") for b in banned)
    )


def test_the_reader_resolves_relative_imports():
    """The check can fail: an upward import written relatively is seen as what it is."""
    found = imports_of(
        "from ..export import sources\nfrom . import tools\nimport torch", "onnxlm.runtime.engine"
    )
    assert {"onnxlm.export", "onnxlm.runtime.tools", "torch"} <= found
    assert offenders({"onnxlm.runtime.engine": found}, "onnxlm.runtime", ("torch", "onnxlm.export")) == [
        "onnxlm.runtime.engine imports onnxlm.export",
        "onnxlm.runtime.engine imports torch",
    ]


def test_runtime_imports_nothing_above_it():
    modules = package_imports()
    above = ("torch", "transformers", "onnxlm.export", "onnxlm.quantize", "onnxlm.cli", "onnxlm.commands")
    assert offenders(modules, "onnxlm.runtime", above) == []
    assert offenders(modules, "onnxlm.bundle", above + ("onnxlm.runtime", "onnxruntime")) == []


def test_only_serving_imports_the_web_stack_and_nothing_imports_serving():
    modules = package_imports()
    web = ("starlette", "uvicorn", "ray", "prometheus_client")
    assert offenders(modules, "onnxlm", web, but="onnxlm.runtime.serving") == []
    inward = ("onnxlm.runtime.serving",)
    assert offenders(modules, "onnxlm.runtime", inward, but="onnxlm.runtime.serving") == []


def test_quantize_imports_no_export_and_rewrites_need_onnx_only():
    modules = package_imports()
    # torch only inside the optional HQQ solver (pack.hqq), which onnxruntime ships
    assert offenders(modules, "onnxlm.quantize", ("onnxlm.export", "transformers")) == []
    rewrites = {i for i in modules["onnxlm.rewrites"] if i != "__future__"}
    assert rewrites <= {"numpy", "onnx"}, rewrites


def test_importing_the_runtime_loads_no_torch_transformers_or_upper_layers():
    """What a process holds after importing the runtime, its evaluation and its scheduler: the package
    root binds `onnxlm.export` (the function, see below), no module of the exporter."""
    code = (
        "import sys, onnxlm.runtime, onnxlm.runtime.eval, onnxlm.runtime.scheduler\n"
        "bad = ('torch', 'transformers', 'onnxlm.export.', 'onnxlm.quantize', 'starlette', 'uvicorn')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in bad or m.startswith(bad[2:4])))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_export_package_loads_only_the_standard_library():
    """`import onnxlm` runs onnxlm/export/__init__.py to bind `onnxlm.export`: at load time it may import
    the standard library only; the exporter (and torch) comes inside the call."""
    tree = ast.parse((PACKAGE / "export" / "__init__.py").read_text(encoding="utf-8"))
    top = ast.Module([n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
    loaded = imports_of(ast.unparse(top), "onnxlm.export.__init__")
    assert loaded and loaded <= set(sys.stdlib_module_names) | {"__future__"}, loaded
