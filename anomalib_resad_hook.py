# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Make models registered under the ``anomalib.models`` entry-point group visible to anomalib.

anomalib 2.7 has no plugin loader: its CLI resolves ``--model ResAD`` only among ``AnomalibModule`` subclasses that are
already imported, and ``anomalib.models.get_model`` only looks inside ``anomalib.models``. This module closes that gap
with the smallest mechanism that works for the ``anomalib`` command, ``get_model`` and ``anomalib benchmark`` alike:

* ``anomalib_resad_hook.pth`` (installed into site-packages next to this file) imports this module at interpreter
  start-up. That costs one tiny import: nothing heavy is imported here.
* :func:`install` puts a finder on ``sys.meta_path`` that waits for ``import anomalib.models``. Right after anomalib has
  executed that module, every entry point of the group ``anomalib.models`` is loaded and set as an attribute of
  ``anomalib.models`` (so ``get_model({"class_path": "ResAD"})`` works) - and importing the plugin makes its class an
  ``AnomalibModule`` subclass, which is what the CLI and ``get_model("ResAD")`` search. Every plugin of the group is
  loaded, not only the one named on the command line: anomalib resolves ``--model NAME`` by scanning the subclasses
  that are already imported, before any hook could see the name.
* On the ``anomalib`` command line, right after ``anomalib.cli.cli`` has installed rich's traceback printer, the
  finder wraps it so that a :class:`~anomalib_resad.errors.ResADError` (a problem the user can fix, recognised by its
  type) prints as one line; every other exception keeps anomalib's report.

Once both have happened the finder removes itself from ``sys.meta_path``. Processes that never import anomalib pay
nothing else. Set ``ANOMALIB_PLUGINS=0`` to switch the hook off.

Example:
    >>> from anomalib.models import get_model  # doctest: +SKIP
    >>> get_model("ResAD")  # doctest: +SKIP
"""

import os
import sys

ENTRY_POINT_GROUP = "anomalib.models"
_TARGET_MODULE = "anomalib.models"
_CLI_MODULE = "anomalib.cli.cli"


def _register_entry_points(models_module: object) -> None:
    """Load every ``anomalib.models`` entry point and expose it as an attribute of ``anomalib.models``."""
    import warnings
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if hasattr(models_module, entry_point.name):
            continue
        plugin_module = sys.modules.get(entry_point.value.partition(":")[0])
        if getattr(getattr(plugin_module, "__spec__", None), "_initializing", False):
            continue  # the plugin itself is importing anomalib: it registers when its own import completes
        try:
            model_class = entry_point.load()
        except Exception as error:
            warnings.warn(
                f"Could not load the anomalib model plugin '{entry_point.name}' ({entry_point.value}): {error!r}. "
                "anomalib's own models still work; reinstall the plugin package to fix it.",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        setattr(models_module, entry_point.name, model_class)
        exported = getattr(models_module, "__all__", None)
        if isinstance(exported, list) and entry_point.name not in exported:
            exported.append(entry_point.name)


def _install_error_report(cli_module: object) -> None:
    """On the ``anomalib`` command line: one-line reports of ResAD's user errors (after rich's traceback hook)."""
    del cli_module
    try:
        from anomalib_resad.errors import install_cli_excepthook
    except ImportError:  # the plugin is not installed in this environment
        return
    install_cli_excepthook(only_for=("anomalib",))


class _RegisteringLoader:
    """Delegating loader: runs the real loader, then the action for that module."""

    def __init__(self, loader: object, fullname: str, finder: "AnomalibModelsFinder") -> None:
        self._loader = loader
        self._fullname = fullname
        self._finder = finder

    def create_module(self, spec: object) -> object:
        return self._loader.create_module(spec)

    def exec_module(self, module: object) -> None:
        self._loader.exec_module(module)
        if self._fullname == _TARGET_MODULE:
            _register_entry_points(module)
        else:
            _install_error_report(module)
        self._finder.done(self._fullname)

    def __getattr__(self, name: str) -> object:
        return getattr(self._loader, name)


def _program_name() -> str:
    """Name of the running program (``anomalib`` for the command line)."""
    from pathlib import Path

    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""


class AnomalibModelsFinder:
    """``sys.meta_path`` finder that only acts on ``anomalib.models`` and ``anomalib.cli.cli``, once each."""

    def __init__(self) -> None:
        self.pending = {_TARGET_MODULE, _CLI_MODULE}

    def done(self, fullname: str) -> None:
        """Forget a module that has been handled; leave ``sys.meta_path`` when nothing is left to wait for."""
        self.pending.discard(fullname)
        if fullname == _TARGET_MODULE and _program_name() != "anomalib":
            self.pending.discard(_CLI_MODULE)  # not the anomalib command line: no error report to install
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        """Return the real spec of a watched module with a loader that acts right after it has executed."""
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader, fullname, self)
                return spec
        return None


def install() -> None:
    """Install the finder once per interpreter (idempotent; a no-op when ``ANOMALIB_PLUGINS=0``)."""
    if os.environ.get("ANOMALIB_PLUGINS", "1") == "0":
        return
    if any(type(finder).__name__ == AnomalibModelsFinder.__name__ for finder in sys.meta_path):
        return
    finder = AnomalibModelsFinder()
    if _TARGET_MODULE in sys.modules:  # anomalib was imported before us: register right away
        _register_entry_points(sys.modules[_TARGET_MODULE])
        finder.done(_TARGET_MODULE)
    if _CLI_MODULE in sys.modules:
        _install_error_report(sys.modules[_CLI_MODULE])
        finder.done(_CLI_MODULE)
    if finder.pending:
        sys.meta_path.insert(0, finder)
