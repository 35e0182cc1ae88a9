"""The design card's layering, checked on the source: kernels/ imports no adapter; the two adapters do not import each
other; the product never imports benchmarks/. Every import statement counts, lazy ones inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = {"vllm_qcbguard", "gguf_tools"}
# package folder -> top-level modules it must never import
FORBIDDEN = {
    "kernels": ADAPTERS | {"qcbguard", "benchmarks", "tests", "vllm", "gguf", "prometheus_client", "transformers"},
    "vllm_qcbguard": {"gguf_tools", "gguf", "llama_cpp", "benchmarks", "tests"},
    "gguf_tools": {"vllm_qcbguard", "vllm", "benchmarks", "tests"},
    "qcbguard": {"vllm_qcbguard", "vllm", "benchmarks", "tests"},
}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_the_layering(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no source under {package}/"
    violations = [
        f"{f.relative_to(ROOT)} imports {m}" for f in files for m in sorted(_imported_modules(f) & FORBIDDEN[package])
    ]
    assert not violations, violations


def test_triton_is_imported_only_by_the_triton_subpackage():
    outside = [
        str(f.relative_to(ROOT))
        for f in sorted((ROOT / "kernels").rglob("*.py"))
        if "triton" in _imported_modules(f) and "triton" not in f.relative_to(ROOT / "kernels").parts[:1]
    ]
    assert not outside, outside
