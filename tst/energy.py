"""``--log-energy``: each GPU's energy per iteration and its power, read from NVML.

NVIDIA's management library counts the energy a GPU has drawn since the driver loaded
(``nvmlDeviceGetTotalEnergyConsumption``, millijoules; Volta and later). :class:`EnergyMeter`
reads that counter on every rank and keeps what was drawn while training: it is paused
around evaluations and checkpoint saves, as Megatron-LM's energy monitor is (and as the
trainer's interval clock is). At each log line the ranks' laps are summed and the trainer
reports, as Megatron-LM does, the energy per iteration per GPU (J) and the power per GPU (W).

The library is loaded with ``ctypes`` from the driver's ``libnvidia-ml.so.1`` (``pynvml``
is not needed). Each rank's GPU is found by its UUID, not its CUDA ordinal: under
``CUDA_VISIBLE_DEVICES`` (Slurm's GPU binding sets it) CUDA's device 0 need not be NVML's
device 0, which is the index Megatron-LM's monitor reads.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from tst.errors import ConfigError

__all__ = ["EnergyMeter", "nvml_energy_reader"]

_NVML_SUCCESS = 0


def nvml_energy_reader(device) -> Callable[[], int]:
    """A function returning ``device``'s energy counter in millijoules, read from NVML.

    Raises :class:`ConfigError` naming what is missing where NVML, the GPU or its energy
    counter cannot be reached."""
    import torch

    if device.type != "cuda":
        raise ConfigError(f"--log-energy reads each GPU's energy counter (NVML); this run is on "
                          f"{device.type}: drop it")  # fmt: skip
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        raise ConfigError("--log-energy reads NVIDIA's management library, libnvidia-ml.so.1 "
                          "(installed with the GPU driver), which cannot be loaded here: drop "
                          "it or put the driver's libraries on LD_LIBRARY_PATH") from None  # fmt: skip

    def call(name: str, *args) -> None:
        status = getattr(lib, name)(*args)
        if status != _NVML_SUCCESS:
            text = lib.nvmlErrorString
            text.restype = ctypes.c_char_p
            raise ConfigError(f"--log-energy: NVML's {name} failed ({text(status).decode()}): "
                              "this GPU or driver does not report its energy; drop the flag")  # fmt: skip

    call("nvmlInit_v2")
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    handle = ctypes.c_void_p()
    call("nvmlDeviceGetHandleByUUID", ("GPU-" + uuid).encode(), ctypes.byref(handle))
    counter = ctypes.c_ulonglong()

    def read() -> int:
        call("nvmlDeviceGetTotalEnergyConsumption", handle, ctypes.byref(counter))
        return int(counter.value)

    read()  # a GPU without the counter fails here, at start
    return read


class EnergyMeter:
    """The energy one rank's device drew while training, in laps between log lines.

    ``read`` returns a counter in millijoules that only grows (NVML's). Start it with
    :meth:`resume`; :meth:`pause` / :meth:`resume` bracket what is not training."""

    def __init__(self, read: Callable[[], int]) -> None:
        self._read = read
        self._lap_mj = 0
        self._since: int | None = None  # the counter when last resumed; None while paused

    def resume(self) -> None:
        if self._since is None:
            self._since = self._read()

    def pause(self) -> None:
        if self._since is not None:
            self._lap_mj += self._read() - self._since
            self._since = None

    def lap_mj(self) -> int:
        """Millijoules drawn (unpaused) since the last lap; the meter keeps running."""
        if self._since is not None:
            now = self._read()
            self._lap_mj += now - self._since
            self._since = now
        lap, self._lap_mj = self._lap_mj, 0
        return lap
