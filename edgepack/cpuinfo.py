"""What /proc/cpuinfo says about a CPU: model, architecture, ISA flags, core count.

Standard library only, Python 3.8+: this file is deployed next to the on-device agent (like
runtime.py) and imported there as the sibling module `cpuinfo`; on the host it is
`edgepack.cpuinfo`. Keep it free of edgepack imports.
"""
import os
import platform

# ISA extensions that decide which int8 kernels a runtime can use (ONNX Runtime's MLAS and
# XNNPACK dispatch on them): x86 AVX2 (vpmaddubsw), AVX-512 (F, BW), VNNI (vpdpbusd, in its
# 512-bit or its 256-bit AVX-VNNI form), AMX; ARM NEON (asimd), the dot product (sdot/udot:
# asimddp), the int8 matrix multiply (i8mm), SVE. Names as Linux writes them.
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",
              "asimd", "asimddp", "i8mm", "sve", "svei8mm")

# Cores by Arm Ltd. (CPU implementer 0x41), by CPU part: names the core where the cpuinfo of a
# board or server names no model.
ARM_PARTS = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
    "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd49": "Neoverse-N2",
}

# Where the model is written: x86 "model name"; a Raspberry Pi's "Model" (the board); older ARM
# kernels "Hardware"; MIPS "cpu model"; 32-bit ARM "Processor".
_MODEL_KEYS = ("model name", "Model", "Hardware", "cpu model", "Processor")


def parse_cpuinfo(text, machine=None):
    """The text of /proc/cpuinfo as {"model", "core", "arch", "flags", "int8_flags", "cores"}.

    `flags`: x86 `flags` or ARM `Features`, the ones every core has (sorted), so a kernel chosen
    from them runs on whichever core a thread lands. `core`: the ARM core's name, else None.
    `arch`: `machine` when given (platform.machine() of the machine the text is from), else
    what the text implies. `cores`: the number of `processor` entries."""
    first = {}
    per_core_flags = []
    cores = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor":
            cores += 1
        elif key in ("flags", "Features"):
            per_core_flags.append(set(value.split()))
        first.setdefault(key, value)
    flags = set.intersection(*per_core_flags) if per_core_flags else set()
    core = None
    if first.get("CPU implementer") == "0x41":
        core = ARM_PARTS.get(first.get("CPU part", ""))
    model = next((first[k] for k in _MODEL_KEYS if first.get(k)), None) or core
    return {
        "model": model, "core": core, "arch": machine or _arch_of(first, flags),
        "flags": sorted(flags), "int8_flags": [f for f in INT8_FLAGS if f in flags], "cores": cores,
    }


def read_cpuinfo(path="/proc/cpuinfo"):
    """parse_cpuinfo() of this machine. Where there is no /proc/cpuinfo (macOS, Windows) the
    model comes from platform.processor() and there are no flags."""
    try:
        with open(path) as f:
            info = parse_cpuinfo(f.read(), platform.machine() or None)
    except OSError:
        info = parse_cpuinfo("", platform.machine() or None)
    info["model"] = info["model"] or platform.processor() or None
    info["cores"] = info["cores"] or os.cpu_count()
    return info


def _arch_of(fields, flags):
    if "flags" in fields:
        return "x86_64" if "lm" in flags else "i686"  # lm: long mode, a 64-bit CPU
    if fields.get("CPU architecture") == "8":
        return "aarch64"
    if fields.get("CPU architecture") == "7":
        return "armv7l"
    return None
