"""edgepack/scheme.py: the int8 scheme follows the device CPU's flags (VNNI or not, ARM), and
where those flags came from is stated."""
from __future__ import annotations

import tomllib

import pytest

from conftest import run_cli
from edgepack.cpuinfo import parse_cpuinfo
from edgepack.errors import EdgepackError
from edgepack.scheme import choose_scheme, describe, flags_for_build, scheme_for_build, scheme_name
from edgepack.targets import Quantization, load_profile, load_profile_file

# A Cascade Lake server: AVX-512 with VNNI.
XEON_VNNI = """processor\t: 0
model name\t: Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz
flags\t\t: fpu sse2 ssse3 sse4_1 lm avx avx2 fma avx512f avx512bw avx512_vnni
processor\t: 1
model name\t: Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz
flags\t\t: fpu sse2 ssse3 sse4_1 lm avx avx2 fma avx512f avx512bw avx512_vnni
"""

# A Haswell-era NUC: AVX2, no VNNI (ORT's U8S8 kernels use vpmaddubsw and can saturate).
HASWELL_NUC = """processor\t: 0
model name\t: Intel(R) Core(TM) i5-4250U CPU @ 1.30GHz
flags\t\t: fpu sse2 ssse3 sse4_1 lm avx avx2 fma
processor\t: 1
model name\t: Intel(R) Core(TM) i5-4250U CPU @ 1.30GHz
flags\t\t: fpu sse2 ssse3 sse4_1 lm avx avx2 fma
"""

# Raspberry Pi 5 (Cortex-A76): NEON with the dot product, no i8mm.
PI5 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd0b

Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""

# Raspberry Pi 4 (Cortex-A72): NEON only.
PI4 = """processor\t: 0
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd08
"""


def device_report(text: str, machine: str) -> dict:
    """What the device agent reports about its CPU (edgepack/agent.py `environment`)."""
    cpu = parse_cpuinfo(text, machine)
    return {"machine": machine, "cpu_model": cpu["model"], "int8_flags": cpu["int8_flags"]}


@pytest.fixture
def x86():
    return load_profile("x86")


def test_vnni_and_non_vnni_devices_get_different_schemes(x86):
    assert x86.quantization.scheme == "auto" and x86.quantization.reduce_range is True  # the default
    fast, fast_rec = scheme_for_build(x86, "xeon", device_report(XEON_VNNI, "x86_64"))
    safe, safe_rec = scheme_for_build(x86, "nuc", device_report(HASWELL_NUC, "x86_64"))

    assert (fast.activation_type, fast.weight_type, fast.reduce_range) == ("QUInt8", "QInt8", False)
    assert fast_rec["scheme"] == "U8S8" and fast_rec["flags"] == ["avx2", "avx512f", "avx512bw", "avx512_vnni"]
    assert "VNNI (avx512_vnni)" in fast_rec["reason"] and "vpdpbusd" in fast_rec["reason"]
    assert fast_rec["flags_from"] == "device xeon (reported by the device)"

    assert (safe.activation_type, safe.weight_type, safe.reduce_range) == ("QUInt8", "QInt8", True)
    assert safe_rec["scheme"] == "U8S8 reduce_range" and safe_rec["flags"] == ["avx2"]
    assert "without VNNI" in safe_rec["reason"] and "saturates" in safe_rec["reason"]
    assert safe_rec["flags_from"] == "device nuc (reported by the device)"
    # What is not the CPU's to decide stays the profile's.
    assert safe.calibration_method == fast.calibration_method == x86.quantization.calibration_method
    assert safe.scheme == fast.scheme == "fixed"  # concrete: nothing left to choose


def test_probe_is_called_only_when_the_caller_has_no_report(x86):
    asked = []

    def probe(name):
        asked.append(name)
        return device_report(HASWELL_NUC, "x86_64")

    assert flags_for_build(x86, "nuc", probe=probe) == (["avx2"], "device nuc (reported by the device)")
    assert asked == ["nuc"]
    flags_for_build(x86, "nuc", device_report(XEON_VNNI, "x86_64"), probe=probe)
    assert asked == ["nuc"]


def test_device_without_flags_or_of_another_arch_is_unknown(x86):
    flags, source = flags_for_build(x86, "old", {"machine": "x86_64", "cpu_count": 4})
    assert flags is None and "did not report" in source
    q, rec = scheme_for_build(x86, "pi", device_report(PI5, "aarch64"))
    assert rec["flags"] is None and "is aarch64 but target 'x86' is x86_64" in rec["flags_from"]
    assert rec["scheme"] == "U8S8 reduce_range" and "unknown" in rec["reason"]  # x86.toml's default
    assert flags_for_build(x86, "nuc") == (None, "device nuc: not probed, its CPU flags are unknown")


def test_host_flags_stand_in_only_for_the_hosts_arch(x86):
    host = parse_cpuinfo(HASWELL_NUC, "x86_64")
    flags, source = flags_for_build(x86, host=host)
    assert flags == ["avx2"] and source.startswith("this host (Intel(R) Core(TM) i5-4250U")
    assert "no --device given" in source and "stands in for the device's" in source
    assert scheme_for_build(x86, host=host)[1]["scheme"] == "U8S8 reduce_range"

    arm_host = parse_cpuinfo(PI5, "aarch64")
    flags, source = flags_for_build(x86, host=arm_host)
    assert flags is None and "this host is aarch64, the target 'x86' is x86_64" in source
    # No /proc/cpuinfo (macOS): no flags at all means unknown, not "a CPU without AVX2".
    assert flags_for_build(x86, host={"arch": "x86_64", "model": None, "flags": [], "int8_flags": []})[0] is None


def test_unknown_flags_keep_the_profiles_default(x86):
    for default in (x86.quantization,
                    x86.quantization.model_copy(update={"reduce_range": True}),
                    x86.quantization.model_copy(update={"weight_type": "QUInt8"})):
        q, rec = choose_scheme(default, "x86_64", None, "unknown: no --device given")
        assert (q.activation_type, q.weight_type, q.reduce_range) == \
               (default.activation_type, default.weight_type, default.reduce_range)
        assert rec["scheme"] == scheme_name(default) and rec["flags"] is None
        assert "flags were unknown (unknown: no --device given)" in rec["reason"] and "--device" in rec["reason"]


@pytest.mark.parametrize("text,machine,kernel", [
    (PI5, "aarch64", "sdot"),
    (PI4, "aarch64", "no dot product (asimddp) reported"),
    ("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\nCPU architecture: 8\n", "aarch64", "smmla"),
])
def test_arm_gets_s8s8_with_its_kernel(text, machine, kernel):
    rpi = load_profile("rpi")
    # Even a profile whose default is U8S8: on ARM the arch decides, ORT's first choice there is S8S8.
    rpi.quantization = rpi.quantization.model_copy(update={"activation_type": "QUInt8"})
    q, rec = scheme_for_build(rpi, "pi", device_report(text, machine))
    assert (q.activation_type, q.weight_type, q.reduce_range) == ("QInt8", "QInt8", False)
    assert rec["scheme"] == "S8S8" and kernel in rec["reason"]
    assert "no U8S8 saturation" in rec["reason"] and "first choice" in rec["reason"]


def test_arm_from_an_x86_host_is_s8s8_with_unknown_flags():
    q, rec = scheme_for_build(load_profile("mobile"), host=parse_cpuinfo(XEON_VNNI, "x86_64"))
    assert rec["scheme"] == "S8S8" and rec["flags"] is None and "flags, which were unknown" in rec["reason"]
    assert "this host is x86_64" in rec["flags_from"]


def test_fixed_profile_is_kept_and_warned_about_saturation(x86):
    fixed = x86.quantization.model_copy(update={"scheme": "fixed", "reduce_range": False})
    q, rec = choose_scheme(fixed, "x86_64", ["avx2"], "device nuc")
    assert q == fixed and rec["scheme"] == "U8S8" and rec["selection"] == "fixed"
    assert "U8S8 without reduce_range can saturate" in rec["warning"] and "reduce_range = true" in rec["warning"]
    s8s8 = fixed.model_copy(update={"activation_type": "QInt8"})
    assert "S8S8 without reduce_range" in choose_scheme(s8s8, "x86_64", ["avx2"], "device nuc")[1]["warning"]
    for ok, flags in ((fixed, ["avx2", "avx512_vnni"]), (fixed.model_copy(update={"reduce_range": True}), ["avx2"]),
                      (fixed.model_copy(update={"weight_type": "QUInt8"}), ["avx2"])):
        assert "warning" not in choose_scheme(ok, "x86_64", flags, "device")[1]
    with pytest.raises(EdgepackError, match="not a list of names"):
        choose_scheme(fixed, "x86_64", "avx2 avx512_vnni", "device xeon")


def test_auto_profile_loads_shows_and_round_trips(tmp_path):
    (tmp_path / "nuc.toml").write_text('arch = "x86_64"\nruntime = "onnxruntime"\n'
                                       '[quantization]\nscheme = "auto"\nreduce_range = true\n')
    nuc = load_profile("nuc", [tmp_path])
    assert nuc.quantization.scheme == "auto" and nuc.quantization.reduce_range is True
    assert describe(nuc.quantization) == "auto (default U8S8 reduce_range) MinMax"
    # A profile without the new fields still loads as before: fixed, 8-bit weights.
    (tmp_path / "old.toml").write_text('arch = "x86_64"\nruntime = "onnxruntime"\n[quantization]\n'
                                       'activation_type = "QUInt8"\n')
    old = load_profile("old", [tmp_path]).quantization
    assert (old.scheme, old.reduce_range) == ("fixed", False)
    (tmp_path / "bad.toml").write_text('arch = "x86_64"\nruntime = "onnxruntime"\n[quantization]\nscheme = "fast"\n')
    with pytest.raises(EdgepackError, match="quantization.scheme"):
        load_profile("bad", [tmp_path])

    code, out, _ = run_cli("targets", "show", "x86")
    assert code == 0 and 'scheme = "auto"' in out and "reduce_range = true" in out
    (tmp_path / "shown.toml").write_text(out)
    assert load_profile_file(tmp_path / "shown.toml").quantization == load_profile("x86").quantization


def test_scheme_names():
    assert scheme_name(Quantization(activation_type="QUInt8", weight_type="QUInt8")) == "U8U8"
    assert scheme_name(Quantization(activation_type="QInt8", weight_type="QInt8")) == "S8S8"
    assert scheme_name(Quantization(reduce_range=True)) == "U8S8 reduce_range"
