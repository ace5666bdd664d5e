"""Emulated devices: run and check aarch64 (Raspberry Pi) artifacts on real aarch64 runtimes
under qemu user-mode emulation, without hardware.

    prepare_emulator(kind="rpi", rebuild=False, progress=None) -> EmulatorEnv
    register_emulated_device(name="pi-emu", kind="rpi") -> Path   (the device toml written)
    remove_emulator(name=None, kind=None) -> {"devices": [...], "caches": [...], "workdirs": [...]}
    run_emulated(args, kind="rpi", ...) -> subprocess.CompletedProcess
    compare_on_emulator(artifact_path, inputs, x86_outputs, kind="rpi", ...) -> dict

Emulated latency means nothing; outputs and the ARM kernels that produce them are real.
"""
from .kinds import KINDS, WHEELS
from .prepare import (EmulatorEnv, cache_base, emulator_for_python, env_root, find_emulator, prepare_emulator,
                      remove_emulator_cache)
from .register import (device_toml, devices_config_dir, list_emulated_devices,
                       register_emulated_device, remove_emulator)
from .run import compare_on_emulator, run_emulated
from .wrappers import find_qemu

__all__ = ["KINDS", "WHEELS", "EmulatorEnv", "cache_base", "emulator_for_python", "env_root", "find_emulator", "find_qemu",
           "prepare_emulator", "remove_emulator_cache", "device_toml", "devices_config_dir",
           "list_emulated_devices", "register_emulated_device", "remove_emulator",
           "compare_on_emulator", "run_emulated"]
