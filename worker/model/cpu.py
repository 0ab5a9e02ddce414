"""What this CPU offers the engines, read from /proc/cpuinfo: bfloat16 units and the vendor."""

from __future__ import annotations

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpuinfo_field(key: str, cpuinfo: str | None) -> str:
    """The value of the first ``key : value`` line of ``cpuinfo`` (default: /proc/cpuinfo); empty if none."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            return ""
    for line in cpuinfo.splitlines():
        if line.startswith(key):
            return line.split(":", 1)[-1].strip()
    return ""


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (AMX-BF16 or AVX512-BF16), from /proc/cpuinfo."""
    flags = set(_cpuinfo_field("flags", cpuinfo).split())
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def cpu_vendor(cpuinfo: str | None = None) -> str:
    """``vendor_id`` from /proc/cpuinfo (``GenuineIntel``, ``AuthenticAMD``, ...); empty if unknown."""
    return _cpuinfo_field("vendor_id", cpuinfo)
