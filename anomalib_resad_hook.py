# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Make models registered under the ``anomalib.models`` entry-point group visible to anomalib.

anomalib 2.7 has no plugin loader: its CLI resolves ``--model ResAD`` only among ``AnomalibModule`` subclasses that are
already imported, and ``anomalib.models.get_model`` only looks inside ``anomalib.models``. This module closes that gap
with the smallest mechanism that works for the ``anomalib`` command, ``get_model`` and ``anomalib benchmark`` alike:

* ``anomalib_resad_hook.pth`` (installed into site-packages next to this file) imports this module at interpreter
  start-up. That costs one tiny import: nothing heavy is imported here.
* :func:`install` puts a finder on ``sys.meta_path`` that waits for ``import anomalib.models``. Right after anomalib has
  executed that module, every plugin of the entry-point group ``anomalib.models`` is imported - and a plugin registers
  itself when imported (``anomalib_resad`` sets ``anomalib.models.ResAD``; its class is then an ``AnomalibModule``
  subclass, which is what the CLI searches). Every plugin of the group is imported, not only the one named on the
  command line: anomalib resolves ``--model NAME`` by scanning the subclasses already imported, before any hook could
  see the name. The finder then leaves ``sys.meta_path``.

Nothing else is changed: errors keep anomalib's own report. Processes that never import anomalib pay nothing else. Set
``ANOMALIB_PLUGINS=0`` to switch the hook off.

Example:
    >>> from anomalib.models import get_model  # doctest: +SKIP
    >>> get_model("ResAD")  # doctest: +SKIP
"""

import os
import sys

ENTRY_POINT_GROUP = "anomalib.models"
_TARGET_MODULE = "anomalib.models"


def _import_plugins() -> None:
    """Import every ``anomalib.models`` entry point's module (each registers itself with anomalib)."""
    import warnings
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        plugin_module = sys.modules.get(entry_point.module)
        if getattr(getattr(plugin_module, "__spec__", None), "_initializing", False):
            continue  # the plugin itself is importing anomalib: it registers when its own import completes
        try:
            entry_point.load()
        except Exception as error:
            warnings.warn(
                f"Could not load the anomalib model plugin '{entry_point.name}' ({entry_point.value}): {error!r}. "
                "anomalib's own models still work; reinstall the plugin package to fix it.",
                RuntimeWarning,
                stacklevel=2,
            )


class _ImportingLoader:
    """Delegating loader: runs the real loader of ``anomalib.models``, then imports the plugins."""

    def __init__(self, loader: object, finder: "AnomalibModelsFinder") -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: object) -> object:
        return self._loader.create_module(spec)

    def exec_module(self, module: object) -> None:
        self._loader.exec_module(module)
        self._finder.remove()
        _import_plugins()

    def __getattr__(self, name: str) -> object:
        return getattr(self._loader, name)


class AnomalibModelsFinder:
    """``sys.meta_path`` finder that acts once, on ``anomalib.models``."""

    def remove(self) -> None:
        """Leave ``sys.meta_path``."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        """Return the real spec of ``anomalib.models`` with a loader that imports the plugins after it."""
        if fullname != _TARGET_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ImportingLoader(spec.loader, self)
                return spec
        return None


def install() -> None:
    """Install the finder once per interpreter (idempotent; a no-op when ``ANOMALIB_PLUGINS=0``)."""
    if os.environ.get("ANOMALIB_PLUGINS", "1") == "0":
        return
    if _TARGET_MODULE in sys.modules:  # anomalib was imported before us: import the plugins right away
        _import_plugins()
        return
    if not any(type(finder).__name__ == AnomalibModelsFinder.__name__ for finder in sys.meta_path):
        sys.meta_path.insert(0, AnomalibModelsFinder())


def resad_main() -> None:
    """Entry point of the ``resad`` console script: :func:`anomalib_resad.cli.main` without two known FutureWarnings.

    Importing ``anomalib.models`` imports a deprecated module of timm's and one of anomalib's own; a user can do
    nothing about either. The filter has to be set before ``anomalib_resad`` is imported (the package imports
    anomalib), so it lives here, outside the package, and applies to the ``resad`` command only: anomalib's own CLI
    and library use of ``anomalib_resad`` keep every warning.
    """
    import warnings

    warnings.filterwarnings("ignore", message="Importing from timm.models.layers is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="The anomalib.models.components.dinov2 package", category=FutureWarning)
    from anomalib_resad.cli import main

    main()
