"""Which int8 scheme (activation and weight signedness, 7-bit weights) suits the device's CPU.

A profile with `[quantization] scheme = "auto"` leaves the choice to the CPU's int8 ISA flags
(edgepack.cpuinfo.INT8_FLAGS, as the device agent reports them):

- x86-64 with VNNI (avx512_vnni, avx_vnni or amx_int8): U8S8. ONNX Runtime's U8S8 kernels use
  vpdpbusd, which multiplies u8 x s8 and accumulates in 32 bits, and unsigned activations let its
  optimizer fuse every convolution (measured, bench/int8_speed.py).
- x86-64 without VNNI: U8S8 with reduce_range. ORT's U8S8 kernels then use vpmaddubsw (AVX2,
  AVX-512BW) or pmaddubsw (SSE4.1), which add pairs of u8 x s8 products in int16 and saturate:
  255 * 127 * 2 = 64770 > 32767. 7-bit weights keep the pair below it (255 * 64 * 2 = 32640).
  ORT's quantization docs: reduce_range "is designed for the U8S8 format on AVX2 and AVX512
  (non-VNNI) machines". Measured (bench/int8_scheme.py, outputs of ORT's AVX2 kernels under an
  emulated Haswell CPU): U8S8 lost 12 dB SQNR on ResNet-18-224 there (29.7 -> 17.7 dB) and 9 dB
  on a trained ResNet; with reduce_range the outputs were the same as on a VNNI CPU, 0.7-1.7 dB
  below plain U8S8, at U8S8's speed. U8U8 does not saturate either but ran slower than fp32 on
  this host (0.77-0.85x), though ORT fused every convolution into QLinearConv for it too.
- x86-64, flags unknown: the profile's own fields (x86.toml: U8S8 with reduce_range, right on
  every x86 CPU), and the record says the flags were unknown.
- ARM (aarch64, armv7l): S8S8, ORT's documented first choice; ARM has no saturation issue (ORT
  docs) and MLAS's ARM64 signed kernels are sdot (asimddp) and smmla (i8mm). No flag changes the
  choice, so it holds with unknown flags too; the flags only name the kernel in the reason.

Where the flags come from at build time is `flags_for_build`: the device's report, else this
host's /proc/cpuinfo when the target's arch is the host's, else unknown.

Imports only edgepack.targets, edgepack.errors and edgepack.cpuinfo: stages and the CLI use it.
"""
from __future__ import annotations

from typing import Callable

from .cpuinfo import INT8_FLAGS, read_cpuinfo
from .errors import EdgepackError
from .targets import Quantization, TargetProfile, normalize_arch

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
ARM_ARCHES = ("aarch64", "armv7l")
ORT_DOCS = "onnxruntime.ai/docs/performance/model-optimizations/quantization.html"

_SHORT = {"QUInt8": "U8", "QInt8": "S8"}


def scheme_name(q: Quantization) -> str:
    """"U8S8", "U8S8 reduce_range", "U8U8", "S8S8": activations then weights, as ORT's docs name them."""
    return f"{_SHORT[q.activation_type]}{_SHORT[q.weight_type]}" + (" reduce_range" if q.reduce_range else "")


def describe(q: Quantization) -> str:
    """One line for tables: "auto (default U8S8) MinMax" or "U8S8 MinMax"."""
    name = f"auto (default {scheme_name(q)})" if q.scheme == "auto" else scheme_name(q)
    return f"{name} {q.calibration_method}"


def _concrete(q: Quantization, activation: str, weight: str, reduce_range: bool) -> Quantization:
    return q.model_copy(update={"scheme": "fixed", "activation_type": activation, "weight_type": weight,
                                "reduce_range": reduce_range})


def _check_flags(flags: list[str] | None, source: str) -> list[str] | None:
    if flags is None:
        return None
    if isinstance(flags, str) or not all(isinstance(f, str) for f in flags):
        raise EdgepackError(f"CPU flags from {source} are not a list of names: {flags!r}",
                            "pass the `int8_flags` list the device agent reports, e.g. [\"avx2\", \"avx512_vnni\"]")
    return [f for f in INT8_FLAGS if f in set(flags)]  # the int8-relevant ones, in a fixed order


def _x86(q: Quantization, flags: list[str]) -> tuple[Quantization, str]:
    vnni = [f for f in VNNI_FLAGS if f in flags]
    if vnni:
        return (_concrete(q, "QUInt8", "QInt8", False),
                f"x86-64 with VNNI ({', '.join(vnni)}): ONNX Runtime's U8S8 kernels use vpdpbusd, which "
                "accumulates u8 x s8 products in 32 bits (no saturation), so 8-bit weights keep their full "
                "precision; unsigned activations let it fuse every convolution (2.6x fp32 on ResNet-18-224, "
                "bench/int8_scheme.py)")
    simd = ("AVX-512BW/AVX2 vpmaddubsw" if "avx512bw" in flags else
            "AVX2 vpmaddubsw" if "avx2" in flags else "SSE4.1 pmaddubsw (no AVX2 reported)")
    return (_concrete(q, "QUInt8", "QInt8", True),
            f"x86-64 without VNNI: ONNX Runtime's U8S8 kernels use {simd}, which adds pairs of u8 x s8 "
            "products in int16 and saturates (255*127*2 > 32767); 7-bit weights (reduce_range) keep every "
            "pair in range at U8S8's speed (ORT docs: reduce_range is designed for U8S8 on non-VNNI "
            f"AVX2/AVX-512, {ORT_DOCS}). Measured on an emulated AVX2 CPU: plain U8S8 lost 12 dB SQNR on "
            "ResNet-18-224, reduce_range none; U8U8 does not saturate but ran slower than fp32 "
            "(bench/int8_scheme.py)")


def _arm(q: Quantization, arch: str, flags: list[str] | None) -> tuple[Quantization, str]:
    if flags is None:
        kernel = "the kernel depends on the flags, which were unknown"
    elif arch == "armv7l":
        kernel = "32-bit ARM: MLAS's NEON kernel serves signed weights"
    elif "i8mm" in flags:
        kernel = "i8mm present: MLAS's S8S8 kernel is smmla (8x8 int8 matrix multiply)"
    elif "asimddp" in flags:
        kernel = "dot product (asimddp) present: MLAS's S8S8 kernel is sdot"
    else:
        kernel = ("no dot product (asimddp) reported, e.g. Cortex-A72/A53: MLAS's NEON kernel for signed "
                  "weights; expect a smaller int8 speed-up than on dot-product cores")
    return (_concrete(q, "QInt8", "QInt8", False),
            f"{arch}: S8S8, ONNX Runtime's documented first choice for QDQ on CPU; ARM has no U8S8 saturation "
            f"issue ({ORT_DOCS}); {kernel}")


def choose_scheme(q: Quantization, arch: str, int8_flags: list[str] | None,
                  source: str) -> tuple[Quantization, dict]:
    """The concrete scheme for a CPU of `arch` with `int8_flags` (None: unknown), and the record
    {"scheme", "reason", "flags", "flags_from", "selection"} the manifest keeps.

    A profile with `scheme = "fixed"` keeps its fields; the record then warns when the flags show
    that those fields saturate on this CPU: signed 8-bit weights without reduce_range and without
    VNNI (U8S8, and S8S8, which ORT ran through the same saturating kernels in bench/int8_scheme.py)."""
    arch = normalize_arch(arch)
    flags = _check_flags(int8_flags, source)
    record = {"flags": flags, "flags_from": source, "selection": q.scheme}
    if q.scheme == "fixed":
        chosen, reason = q, "set in the target profile (scheme = \"fixed\")"
        if arch == "x86_64" and flags is not None and not any(f in flags for f in VNNI_FLAGS) \
                and q.weight_type == "QInt8" and not q.reduce_range:
            record["warning"] = (f"this CPU has no VNNI: {scheme_name(q)} without reduce_range can saturate in "
                                 "ONNX Runtime's vpmaddubsw kernels; set reduce_range = true or scheme = \"auto\" "
                                 "in the profile")
    elif arch in ARM_ARCHES:
        chosen, reason = _arm(q, arch, flags)
    elif arch != "x86_64":
        chosen, reason = _concrete(q, q.activation_type, q.weight_type, q.reduce_range), \
            f"no int8 scheme rule for arch {arch!r}: the profile's default"
    elif flags is None:
        chosen = _concrete(q, q.activation_type, q.weight_type, q.reduce_range)
        reason = (f"the CPU's int8 flags were unknown ({source}): the profile's default; build with "
                  "--device NAME so the device's own flags decide (without VNNI, U8S8 needs reduce_range)")
    else:
        chosen, reason = _x86(q, flags)
    record.update({"scheme": scheme_name(chosen), "reason": reason})
    return chosen, {k: record[k] for k in ("scheme", "reason", "flags", "flags_from", "selection", "warning")
                    if k in record}


DeviceProbe = Callable[[str], dict]


def flags_for_build(profile: TargetProfile, device: str | None = None, device_info: dict | None = None,
                    probe: DeviceProbe | None = None, host: dict | None = None) -> tuple[list[str] | None, str]:
    """The int8 flags a build should choose its scheme from, and where they came from.

    (a) `device` given: its own report. `device_info` is what the caller already has (the agent's
        environment or a check_device result: a dict with "int8_flags" and "machine"); without it
        `probe(device)` is called when given (e.g. edgepack.devices.check_device), else unknown.
    (b) no device and the target's arch is this host's: this host's /proc/cpuinfo (`host`, a
        read_cpuinfo() dict, defaults to this machine), said so in the source.
    (c) otherwise unknown (None): the profile's default applies."""
    arch = profile.arch
    if device:
        if device_info is None and probe is not None:
            device_info = probe(device)
        if device_info is None:
            return None, f"device {device}: not probed, its CPU flags are unknown"
        machine = normalize_arch(device_info.get("machine") or device_info.get("arch"))
        if machine and machine != arch:
            return None, (f"device {device} is {machine} but target {profile.name!r} is {arch}: "
                          "its CPU flags do not apply")
        if device_info.get("int8_flags") is None:
            if device_info.get("error"):
                return None, f"device {device} could not be probed for its CPU flags: {device_info['error']}"
            return None, f"device {device} did not report its CPU's int8 flags (an older agent or probe)"
        return list(device_info["int8_flags"]), f"device {device} (reported by the device)"
    host = host if host is not None else read_cpuinfo()
    host_arch = normalize_arch(host.get("arch"))
    if host_arch != arch:
        return None, (f"unknown: no --device given and this host is {host_arch or 'of unknown arch'}, "
                      f"the target {profile.name!r} is {arch}")
    if not host.get("flags"):  # no /proc/cpuinfo (macOS, Windows): nothing is known, not "no flags"
        return None, "unknown: no --device given and this host has no /proc/cpuinfo to read flags from"
    return list(host["int8_flags"]), (f"this host ({host.get('model') or 'unknown CPU'}): no --device given "
                                      f"and the target's arch {arch} is this machine's, so its CPU stands "
                                      "in for the device's")


def scheme_for_build(profile: TargetProfile, device: str | None = None, device_info: dict | None = None,
                     probe: DeviceProbe | None = None, host: dict | None = None) -> tuple[Quantization, dict]:
    """flags_for_build then choose_scheme: what the quantize stage calls."""
    flags, source = flags_for_build(profile, device, device_info, probe, host)
    return choose_scheme(profile.quantization, profile.arch, flags, source)
