"""Emulated devices: run and check aarch64 (Raspberry Pi) artifacts on real aarch64 runtimes
under qemu user-mode emulation, without hardware.

Emulated latency means nothing; outputs and the ARM kernels that produce them are real.
"""
from .kinds import KINDS, WHEELS
from .prepare import (EmulatorEnv, cache_base, env_root, find_emulator, find_qemu, prepare_emulator,
                      remove_emulator_cache)

__all__ = ["KINDS", "WHEELS", "EmulatorEnv", "cache_base", "env_root", "find_emulator", "find_qemu",
           "prepare_emulator", "remove_emulator_cache"]
