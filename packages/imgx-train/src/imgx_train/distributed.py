"""What the processes of a multi-host run must agree on, decided once by process 0.

Every process runs the same program, but a choice made from the clock, the file system or
a signal can differ between hosts: the name of a new run folder (a timestamp), the
checkpoint step a resume restores (one host may see a step another cannot read), or
whether to stop (a Ctrl-C or SIGTERM reaches one host first). Each such choice is made by
process 0 and broadcast, or combined over all processes, with the collectives of
`jax.experimental.multihost_utils`. With one process every function returns its input
and runs no collective.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from imgx_train.devices import is_main_process


def broadcast_from_main(value: Any) -> Any:
    """Process 0's `value` (any JSON value) on every process; others may pass anything.

    Sent as UTF-8 JSON bytes, length first, because the collective needs equal shapes on
    every process.
    """
    if jax.process_count() == 1:
        return value
    main = is_main_process()
    data = json.dumps(value).encode() if main else b""
    length = int(multihost_utils.broadcast_one_to_all(np.int32(len(data)), is_source=main))
    buffer = np.zeros(length, np.uint8)
    if main:
        buffer[:] = np.frombuffer(data, np.uint8)
    received = multihost_utils.broadcast_one_to_all(buffer, is_source=main)
    return json.loads(np.asarray(received, np.uint8).tobytes().decode())


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on at least one of them.

    A stop request (Ctrl-C, SIGTERM) seen by one host thus stops every host after the
    same step, so that all of them join the same checkpoint save.
    """
    if jax.process_count() == 1:
        return flag
    flags = multihost_utils.process_allgather(np.array([flag], np.int32))
    return bool(np.asarray(flags).any())


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (e.g. before reading files
    that process 0 writes)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def process_tag() -> str:
    """`<host>-<pid>`: unique among the processes of a run writing to one shared folder."""
    host = "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname())
    return f"{host}-{os.getpid()}"
