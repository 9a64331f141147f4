"""Merge methods, one pure function per file; importing this package registers them all.

Adding a method is adding a file here: `alloy methods`, recipe validation and the contract tests
pick it up from the registry (see alloy.merge.registry).
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
