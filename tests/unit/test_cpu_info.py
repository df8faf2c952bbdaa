# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""The benchmarks' CPU record, parsed from fake ``/proc/cpuinfo`` texts (issue 15: speed ratios depend on the CPU)."""

import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

import pytest

# Loaded from its file: importing the module the usual way would first import the package (torch, anomalib),
# this parser does not need - the test stays well under a second.
_PATH = Path(__file__).resolve().parents[2] / "anomalib_resad" / "experiments" / "cpu_info.py"
_SPEC = importlib.util.spec_from_file_location("resad_cpu_info_under_test", _PATH)
cpu_info_module = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = cpu_info_module  # dataclasses look their module up while the class is built
_SPEC.loader.exec_module(cpu_info_module)
parse_cpuinfo = cpu_info_module.parse_cpuinfo

XEON_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht syscall "
    "nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni pclmulqdq ssse3 "
    "fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm "
    "3dnowprefetch fsgsbase bmi1 hle avx2 smep bmi2 erms invpcid rtm avx512f avx512dq rdseed adx smap avx512ifma "
    "clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 wbnoinvd "
    "arat avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg "
    "avx512_vpopcntdq rdpid cldemote movdiri movdir64b md_clear serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile "
    "amx_int8 arch_capabilities"
)


def processor_block(index: int, **fields: str) -> str:
    """One processor of /proc/cpuinfo; ``cpu_family`` and ``model_name`` are written with a space, as there."""
    names = {"cpu_family": "cpu family", "model_name": "model name"}
    lines = [f"processor\t: {index}", *(f"{names.get(key, key)}\t: {value}" for key, value in fields.items())]
    return "\n".join(lines) + "\n\n"


XEON = "".join(
    processor_block(
        index,
        vendor_id="GenuineIntel",
        cpu_family="6",
        model="143",
        model_name="Intel(R) Xeon(R) Platinum 8480+",
        stepping="8",
        flags=XEON_FLAGS,
    )
    for index in range(4)
)
# The issue's machine: Intel Xeon model 207, AVX-512 with avx512_bf16 but no AMX exposed (virtual machine).
XEON_NO_AMX = processor_block(
    0,
    vendor_id="GenuineIntel",
    cpu_family="6",
    model="207",
    model_name="Intel(R) Xeon(R) Processor",
    flags=XEON_FLAGS.replace(" amx_bf16", "").replace(" amx_tile", "").replace(" amx_int8", ""),
)
EPYC = "".join(
    processor_block(
        index,
        vendor_id="AuthenticAMD",
        cpu_family="25",
        model="1",
        model_name="AMD EPYC",
        flags="fpu vme de pse tsc msr pae mce cx8 apic sse sse2 ht syscall nx lm pni ssse3 fma sse4_1 sse4_2 avx "
        "f16c bmi1 avx2 bmi2 sha_ni",
    )
    for index in range(2)
)
GRAVITON = (
    "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
    "asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm "
    "ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n\n"
    "processor\t: 1\nFeatures\t: fp asimd\n\n"
)


def test_intel_xeon_with_bf16_and_amx() -> None:
    info = parse_cpuinfo(XEON)
    assert info.model_name == "Intel(R) Xeon(R) Platinum 8480+"
    assert info.logical_cores == 4
    assert (info.vendor, info.family, info.model, info.architecture) == ("GenuineIntel", 6, 143, "x86")
    assert info.isa == (
        "AVX2",
        "FMA",
        "AVX-512F",
        "AVX512-VNNI",
        "AVX-VNNI",
        "AVX512-BF16",
        "AVX512-FP16",
        "AMX-TILE",
        "AMX-BF16",
        "AMX-INT8",
    )
    assert info.missing_isa == ()
    assert info.has("avx512_bf16")
    assert info.has("amx_tile")
    assert "lacks" not in info.summary()


def test_intel_xeon_of_issue_15_without_amx() -> None:
    info = parse_cpuinfo(XEON_NO_AMX)
    assert (info.model_name, info.model, info.logical_cores) == ("Intel(R) Xeon(R) Processor", 207, 1)
    assert info.has("avx512_bf16")
    assert info.missing_isa == ("AMX-TILE", "AMX-BF16", "AMX-INT8")
    assert info.summary().endswith("lacks AMX-TILE, AMX-BF16, AMX-INT8")


def test_amd_epyc_with_only_avx2() -> None:
    info = parse_cpuinfo(EPYC)
    assert info.model_name == "AMD EPYC"
    assert info.logical_cores == 2
    assert (info.vendor, info.family, info.model) == ("AuthenticAMD", 25, 1)
    assert info.isa == ("AVX2", "FMA")
    assert not info.has("avx512f")
    assert "AVX-512F" in info.missing_isa
    assert "AMX-TILE" in info.missing_isa
    assert info.summary() == (
        "AMD EPYC (AuthenticAMD family 25 model 1), 2 logical cores; has AVX2, FMA; lacks AVX-512F, AVX512-VNNI, "
        "AVX-VNNI, AVX512-BF16, AVX512-FP16, AMX-TILE, AMX-BF16, AMX-INT8"
    )


def test_arm_features_line() -> None:
    info = parse_cpuinfo(GRAVITON, fallback_name="aarch64")
    assert info.architecture == "arm"
    assert info.model_name == "aarch64"  # Arm's cpuinfo names no model
    assert info.logical_cores == 2
    assert info.isa == ("NEON", "DOTPROD", "SVE", "BF16", "I8MM")
    assert info.model is None


@pytest.mark.parametrize("text", [None, "", "\n\n"])
def test_absent_or_empty_cpuinfo_falls_back_to_platform(text: str | None) -> None:
    info = parse_cpuinfo(text)
    assert info.model_name == (platform.processor() or platform.machine() or "unknown CPU")
    assert info.logical_cores == os.cpu_count()
    assert (info.vendor, info.family, info.model, info.architecture) == (None, None, None, None)
    assert info.isa == info.missing_isa == ()
    assert info.summary().endswith("ISA extensions unknown (no /proc/cpuinfo flags)")


def test_missing_file_and_json_record(tmp_path: Path) -> None:
    info = cpu_info_module.cpu_info(tmp_path / "no_cpuinfo")
    assert info.architecture is None
    assert info.logical_cores == os.cpu_count()
    record = json.loads(json.dumps(parse_cpuinfo(EPYC).to_dict()))
    assert record["model_name"] == "AMD EPYC"
    assert record["isa"] == ["AVX2", "FMA"]
    assert "AVX512-BF16" in record["missing_isa"]


def test_runtime_versions_and_description() -> None:
    versions = cpu_info_module.runtime_versions()
    assert set(versions) == {"python", "torch", "openvino", "anomalib", "anomalib-resad", "anomalib_resad commit"}
    assert versions["python"] == platform.python_version()
    text = cpu_info_module.describe(parse_cpuinfo(EPYC), versions)
    assert text.startswith("CPU: AMD EPYC (AuthenticAMD family 25 model 1), 2 logical cores; has AVX2")
    assert "\nRuntimes: python " in text
