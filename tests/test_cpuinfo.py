"""edgepack/cpuinfo.py: one /proc/cpuinfo parser for the host, the agent and the emulator."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgepack.cpuinfo import parse_cpuinfo, read_cpuinfo
from edgepack.emulate.kinds import KINDS

XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor @ 2.60GHz
flags\t\t: fpu sse2 lm avx avx2 avx512f avx512bw avx512_vnni avx512vl
bogomips\t: 5187.81

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor @ 2.60GHz
flags\t\t: fpu sse2 lm avx avx2 avx512f avx512bw avx512_vnni avx512vl
"""

# A hybrid laptop part: AVX-VNNI in its 256-bit form, no AVX-512.
ALDER_LAKE = """processor\t: 0
model name\t: 12th Gen Intel(R) Core(TM) i7-1255U
flags\t\t: fpu lm avx2 avx_vnni
"""

# 32-bit Raspberry Pi OS on a Pi 3: the per-core "model name" is the ARM core's, "Model" the board.
PI3_ARMV7 = """processor\t: 0
model name\t: ARMv7 Processor rev 4 (v7l)
Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32
CPU implementer\t: 0x41
CPU architecture: 7
CPU part\t: 0xd03

Hardware\t: BCM2835
Model\t\t: Raspberry Pi 3 Model B Rev 1.2
"""

# An ARM server whose cpuinfo names no model; one core (of a big.LITTLE-like mix) lacks i8mm.
GRAVITON_LIKE = """processor\t: 0
Features\t: fp asimd asimddp i8mm sve
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd40

processor\t: 1
Features\t: fp asimd asimddp sve
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd40
"""


def test_x86_model_flags_and_int8_extensions():
    info = parse_cpuinfo(XEON)
    assert info["model"] == "Intel(R) Xeon(R) Processor @ 2.60GHz" and info["core"] is None
    assert info["arch"] == "x86_64" and info["cores"] == 2
    assert info["int8_flags"] == ["avx2", "avx512f", "avx512bw", "avx512_vnni"]
    assert "avx512vl" in info["flags"] and info["flags"] == sorted(info["flags"])
    assert parse_cpuinfo(ALDER_LAKE)["int8_flags"] == ["avx2", "avx_vnni"]


def test_arm_boards_name_the_board_and_the_core():
    pi3 = parse_cpuinfo(PI3_ARMV7)
    assert pi3["model"] == "ARMv7 Processor rev 4 (v7l)" and pi3["core"] == "Cortex-A53"
    assert pi3["arch"] == "armv7l" and pi3["cores"] == 1 and pi3["int8_flags"] == []
    server = parse_cpuinfo(GRAVITON_LIKE)
    # No model line: the core's name stands in. Only what every core has counts.
    assert server["model"] == server["core"] == "Neoverse-V1" and server["arch"] == "aarch64"
    assert server["int8_flags"] == ["asimd", "asimddp", "sve"] and server["cores"] == 2
    assert parse_cpuinfo(GRAVITON_LIKE, machine="arm64")["arch"] == "arm64"


def test_emulated_pis_cpuinfo_reads_back_as_written():
    pi4, pi5 = parse_cpuinfo(KINDS["rpi"].cpuinfo()), parse_cpuinfo(KINDS["rpi5"].cpuinfo())
    assert (pi4["model"], pi4["core"], pi4["cores"]) == ("Raspberry Pi 4 Model B Rev 1.4", "Cortex-A72", 4)
    assert pi4["int8_flags"] == ["asimd"]             # Cortex-A72: NEON, no dot product
    assert (pi5["core"], pi5["int8_flags"]) == ("Cortex-A76", ["asimd", "asimddp"])


def test_this_machine_and_a_machine_without_proc_cpuinfo(tmp_path):
    here = read_cpuinfo()
    assert here["cores"] >= 1 and here["model"]
    missing = read_cpuinfo(str(tmp_path / "no-cpuinfo"))
    assert missing["flags"] == [] and missing["int8_flags"] == [] and missing["cores"] >= 1


def test_module_runs_alone_as_the_agent_imports_it(tmp_path):
    """Deployed beside agent.py without edgepack: it imports with the standard library only
    (-S: no site-packages at all, so neither edgepack nor anything installed is importable)."""
    src = Path(__file__).resolve().parents[1] / "edgepack" / "cpuinfo.py"
    (tmp_path / "cpuinfo.py").write_text(src.read_text())
    (tmp_path / "probe.py").write_text("import json, cpuinfo\n"
                                       "print(json.dumps([cpuinfo.__file__, cpuinfo.read_cpuinfo()]))\n")
    p = subprocess.run([sys.executable, "-S", "-E", str(tmp_path / "probe.py")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    path, info = json.loads(p.stdout)
    assert path == str(tmp_path / "cpuinfo.py") and info == read_cpuinfo()
