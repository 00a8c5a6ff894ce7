"""Names a package exports but imports only on first use (keeps `import orchestrator...` light)."""

import importlib
from typing import Callable, Dict, List, Tuple


def lazy_exports(package: str, exports: Dict[str, List[str]], namespace: dict) -> Tuple[List[str], Callable, Callable]:
    """(`__all__`, `__getattr__`, `__dir__`) for `package`, importing each name's module when first asked for.

    `exports` maps a module to the names it provides; `namespace` is the package's globals(), where a
    resolved name is cached so later lookups skip `__getattr__`.
    """
    module_of = {name: module for module, names in exports.items() for name in names}
    names = sorted(module_of)

    def __getattr__(name: str):
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_of[name]), name)
        namespace[name] = value
        return value

    def __dir__():
        return names

    return names, __getattr__, __dir__
