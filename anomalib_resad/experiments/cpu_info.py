# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
r"""What a speed figure was measured on: the CPU, the instruction-set extensions that decide its kernels, the runtimes.

Speed *ratios* between runtimes depend on the CPU, not only on the model: OpenVINO computes in bf16 by default
only where the CPU has bf16 units (``avx512_bf16`` or AMX), VNNI and AMX speed up int8, and where both runtimes run
plain f32 matrix products with AVX2 or AVX-512 kernels the ratio tends to 1. The benchmarks therefore print this
record above every table (issue 15).

The parser takes the *text* of ``/proc/cpuinfo`` (Linux, x86 and Arm), so it is testable anywhere;
:func:`cpu_info` reads the file and falls back to :func:`platform.processor` where it is absent (macOS, Windows).
This module imports nothing heavy: versions are read from the installed packages' metadata.

Example:
    >>> text = "processor : 0\nvendor_id : GenuineIntel\nmodel name : Xeon\nflags : fpu avx2 avx512f\n"
    >>> info = parse_cpuinfo(text)
    >>> info.model_name, info.logical_cores, info.isa
    ('Xeon', 1, ('AVX2', 'AVX-512F'))
"""

import os
import platform
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

# Linux flag name -> label, in display order. x86 from the "flags" line, Arm from the "Features" line.
X86_ISA = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512F",
    "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "avx512_fp16": "AVX512-FP16",
    "amx_tile": "AMX-TILE",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
}
ARM_ISA = {
    "asimd": "NEON",
    "asimddp": "DOTPROD",
    "sve": "SVE",
    "sve2": "SVE2",
    "bf16": "BF16",
    "i8mm": "I8MM",
}
CPUINFO_PATH = Path("/proc/cpuinfo")
_REPOSITORY = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CPUInfo:
    """The CPU a measurement ran on.

    Args:
        model_name (str): ``model name`` of ``/proc/cpuinfo`` (virtual machines often show a generic one, e.g.
            ``"AMD EPYC"``: family and model then tell the generation), else :func:`platform.processor`.
        logical_cores (int | None): Logical processors listed (``processor`` entries), else :func:`os.cpu_count`.
        vendor (str | None): ``vendor_id`` (x86), e.g. ``"GenuineIntel"``.
        family (int | None): ``cpu family`` (x86).
        model (int | None): ``model`` number (x86), e.g. ``207`` for the Xeon of issue 15.
        flags (frozenset[str]): All flags of the first processor (x86 ``flags`` or Arm ``Features``).
        architecture (str | None): ``"x86"`` or ``"arm"`` after the flags line found; ``None`` when there was none.
    """

    model_name: str
    logical_cores: int | None = None
    vendor: str | None = None
    family: int | None = None
    model: int | None = None
    flags: frozenset[str] = field(default_factory=frozenset)
    architecture: str | None = None

    @property
    def _known(self) -> dict[str, str]:
        return {"x86": X86_ISA, "arm": ARM_ISA}.get(self.architecture or "", {})

    @property
    def isa(self) -> tuple[str, ...]:
        """Labels of the extensions that matter for inference speed which this CPU has (display order)."""
        return tuple(label for flag, label in self._known.items() if flag in self.flags)

    @property
    def missing_isa(self) -> tuple[str, ...]:
        """Labels of those extensions (of its architecture) which this CPU lacks."""
        return tuple(label for flag, label in self._known.items() if flag not in self.flags)

    def has(self, flag: str) -> bool:
        """Whether the CPU lists ``flag`` (a Linux flag name such as ``"avx512_bf16"``)."""
        return flag in self.flags

    def summary(self) -> str:
        """One line: model, family/model numbers, cores, the extensions present and those absent.

        Example:
            >>> CPUInfo("AMD EPYC", 2, "AuthenticAMD", 25, 1, frozenset({"avx2"}), "x86").summary().split("; ")[:2]
            ['AMD EPYC (AuthenticAMD family 25 model 1), 2 logical cores', 'has AVX2']
        """
        numbers = [self.vendor or "", f"family {self.family}" if self.family is not None else ""]
        numbers.append(f"model {self.model}" if self.model is not None else "")
        identity = " ".join(part for part in numbers if part)
        text = f"{self.model_name}" + (f" ({identity})" if identity else "")
        text += f", {self.logical_cores if self.logical_cores is not None else '?'} logical cores"
        if self.architecture is None:
            return text + "; ISA extensions unknown (no /proc/cpuinfo flags)"
        text += "; has " + (", ".join(self.isa) or "none of " + ", ".join(self._known.values()))
        if self.isa and self.missing_isa:
            text += "; lacks " + ", ".join(self.missing_isa)
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (only the flags that matter, not all of them)."""
        return {
            "model_name": self.model_name,
            "logical_cores": self.logical_cores,
            "vendor": self.vendor,
            "family": self.family,
            "model": self.model,
            "architecture": self.architecture,
            "isa": list(self.isa),
            "missing_isa": list(self.missing_isa),
        }


def _integer(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def parse_cpuinfo(text: str | None, fallback_name: str | None = None) -> CPUInfo:
    """Parse the text of ``/proc/cpuinfo``; the fields of the first processor describe the CPU.

    Args:
        text (str | None): The file's text; ``None`` or empty when it is absent.
        fallback_name (str | None): Model name when the text has none (default :func:`platform.processor`, then
            :func:`platform.machine`).

    Returns:
        CPUInfo: The parsed record. Without a text: the fallback name, :func:`os.cpu_count` cores, no flags.
    """
    first: dict[str, str] = {}
    processors = 0
    for line in (text or "").splitlines():
        key, separator, value = line.partition(":")
        if not separator:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            processors += 1
        first.setdefault(key, value)  # the first processor's fields (Arm may list "Hardware" after all of them)
    if "flags" in first:
        architecture, flags = "x86", first["flags"]
    elif "features" in first:
        architecture, flags = "arm", first["features"]
    else:
        architecture, flags = None, ""
    name = first.get("model name") or first.get("hardware") or first.get("cpu model")
    if not name:
        name = fallback_name or platform.processor() or platform.machine() or "unknown CPU"
    return CPUInfo(
        model_name=name,
        logical_cores=processors or os.cpu_count(),
        vendor=first.get("vendor_id"),
        family=_integer(first.get("cpu family")),
        model=_integer(first.get("model")) if architecture == "x86" else None,
        flags=frozenset(flags.lower().split()),
        architecture=architecture,
    )


def cpu_info(path: str | Path = CPUINFO_PATH) -> CPUInfo:
    """The CPU of this machine: ``/proc/cpuinfo`` where it exists, else :func:`platform.processor`."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = None
    return parse_cpuinfo(text)


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(repository: str | Path, *arguments: str) -> str:
    """Output of ``git -C repository arguments...`` (raises on failure)."""
    command = ["git", "-C", str(repository), *arguments]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=10).stdout.strip()


def source_commit(repository: str | Path = _REPOSITORY) -> str | None:
    """``git rev-parse --short HEAD`` of the source tree, ``+dirty`` with uncommitted changes; ``None`` outside git."""
    try:
        commit = _git(repository, "rev-parse", "--short", "HEAD")
        changes = _git(repository, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if changes else commit or None


def runtime_versions() -> dict[str, str | None]:
    """Python, torch, OpenVINO, anomalib and anomalib-resad versions, and the source commit (when in git)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "openvino", "anomalib", "anomalib-resad"):
        versions[name] = _package_version(name)
    versions["anomalib_resad commit"] = source_commit()
    return versions


def describe(info: CPUInfo | None = None, versions: dict[str, str | None] | None = None) -> str:
    """Two lines for the top of a benchmark's output: ``CPU: ...`` and ``Runtimes: ...``."""
    info = info or cpu_info()
    versions = versions if versions is not None else runtime_versions()
    runtimes = ", ".join(f"{name} {value or 'unknown'}" for name, value in versions.items())
    return f"CPU: {info.summary()}\nRuntimes: {runtimes}"
