"""The package stands on its own: every runtime dependency is used, and no machine-specific rule is in it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "router_client")


def _sources() -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for package in PACKAGES
            for path in sorted((ROOT / package).rglob("*.py"))}


def test_every_runtime_dependency_is_imported_by_the_package() -> None:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    code = "\n".join(_sources().values())
    unused = []
    for requirement in dependencies:
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
        module = name.lower().replace("-", "_")
        if not re.search(rf"^\s*(import|from) {module}\b", code, re.MULTILINE):
            unused.append(name)
    assert not unused, f"runtime dependencies nothing in {PACKAGES} imports: {unused}"


def test_no_port_number_is_special_cased_in_the_package() -> None:
    # A rule for one machine's reserved port belongs to that machine, not to the product (issue 19).
    found = [f"{path.relative_to(ROOT)}:{number}" for path, text in _sources().items()
             for number, line in enumerate(text.splitlines(), 1)
             if re.search(r"port\s*[!=]=\s*\d{2,5}\b|\b\d{2,5}\s*[!=]=\s*port\b", line)]
    assert not found, found
