"""Device errors. Both are EdgepackErrors (exit code 2) whose message names the device.

`DeviceUnreachable` is the transient kind (refused or timed-out connection, connection lost,
command timed out): the fleet retries those. `DeviceError` is everything a retry cannot fix
(refused key, changed host key, missing runtime, wrong arch, full disk, tampered file).
"""
from __future__ import annotations

from ..errors import EdgepackError


class DeviceError(EdgepackError):
    pass


class DeviceUnreachable(DeviceError):
    pass
