"""What an emulated device is: the CPU qemu emulates, the /proc/cpuinfo it shows, the pinned versions.

Everything that changes the prepared environment is in `versions` and therefore in the cache key.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import EdgepackError

# Debian release whose arm64 python3.11 and libraries make the sysroot. Raspberry Pi OS 12 is
# Debian bookworm, so the interpreter and glibc are the ones a Pi actually runs.
DEBIAN_SUITE = "bookworm"
PYTHON_VERSION = "3.11"

# aarch64 wheels installed into the emulated site-packages. The same versions as the x86 side of
# edgepack (onnxruntime 1.32, ai-edge-litert 2.3.0, numpy 2.4): x86 vs aarch64 comparisons then
# differ only in the kernels, not in the runtime release. ai-edge-litert 2.3.0 publishes a
# cp311 manylinux_2_27_aarch64 wheel and works with numpy 2.
WHEELS = {
    "onnxruntime": "1.32.0",
    "ai-edge-litert": "2.3.0",
    "numpy": "2.4.6",
}

# Debian packages whose dependency closure (resolved by apt for arm64) forms the sysroot. Only
# shared libraries and the interpreter are unpacked (see `_keep_package`); tools like dpkg and
# tar that apt pulls in as dependencies are skipped.
DEBIAN_PACKAGES = ["python3.11-minimal", "libpython3.11-stdlib", "libstdc++6"]

# manylinux tags pip accepts for the sysroot's glibc (2.36). pip does not expand a single
# manylinux_2_X tag to the older ones, so all are listed.
PIP_PLATFORMS = [f"manylinux_2_{v}_aarch64" for v in (17, 24, 26, 27, 28, 31, 34, 35, 36)] + [
    "manylinux2014_aarch64"]

# Bump when the preparation recipe changes in a way that needs a fresh cache.
RECIPE = 1

_CPU_BLOCK = """processor\t: {i}
BogoMIPS\t: {bogomips}
Features\t: {features}
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: {variant}
CPU part\t: {part}
CPU revision\t: {revision}
"""


@dataclass(frozen=True)
class Kind:
    name: str
    description: str
    target: str          # edgepack target profile the device runs
    qemu_cpu: str        # qemu -cpu model: decides the ISA features (and so the kernels) used
    cores: int
    bogomips: str
    features: str
    variant: str
    part: str
    revision: str
    hardware: dict = field(default_factory=dict)

    def cpuinfo(self) -> str:
        blocks = [_CPU_BLOCK.format(i=i, bogomips=self.bogomips, features=self.features,
                                    variant=self.variant, part=self.part, revision=self.revision)
                  for i in range(self.cores)]
        tail = "".join(f"{k}\t\t: {v}\n" for k, v in self.hardware.items())
        return "\n".join(blocks) + "\n" + tail


KINDS: dict[str, Kind] = {
    # Raspberry Pi 4 Model B: 4x Cortex-A72 (ARMv8.0-A, NEON, no dot product).
    "rpi": Kind(
        name="rpi", description="Raspberry Pi 4 Model B (4x Cortex-A72), 64-bit Raspberry Pi OS 12",
        target="rpi", qemu_cpu="cortex-a72", cores=4, bogomips="108.00",
        features="fp asimd evtstrm crc32 cpuid", variant="0x0", part="0xd08", revision="3",
        hardware={"Hardware": "BCM2835", "Revision": "c03114", "Serial": "10000000e5c0ffee",
                  "Model": "Raspberry Pi 4 Model B Rev 1.4"}),
    # Raspberry Pi 5: 4x Cortex-A76 (ARMv8.2-A with dot product and fp16).
    "rpi5": Kind(
        name="rpi5", description="Raspberry Pi 5 (4x Cortex-A76), 64-bit Raspberry Pi OS 12",
        target="rpi", qemu_cpu="cortex-a76", cores=4, bogomips="108.00",
        features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                 "asimdrdm lrcpc dcpop asimddp",
        variant="0x4", part="0xd0b", revision="1",
        hardware={"Revision": "c04170", "Serial": "e5c0ffee12345678",
                  "Model": "Raspberry Pi 5 Model B Rev 1.0"}),
}


def get_kind(kind: str) -> Kind:
    try:
        return KINDS[kind]
    except KeyError:
        raise EdgepackError(f"unknown emulated device kind {kind!r}",
                            f"choose one of: {', '.join(KINDS)}") from None
