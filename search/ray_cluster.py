"""The one place the sweep starts or joins Ray: `init_ray`, used by the launcher and the Ray driver.

A local Ray (no address) binds to the loopback interface only: GCS, raylets, workers and the
driver all listen on 127.0.0.1, so a sweep on a shared host exposes nothing to the network. A
cluster address (`--address ray-head:6379` or `auto`) is the user asking for a cluster; then Ray's
own node address is used.
"""
from __future__ import annotations

import os
from typing import Optional

from tracking.credentials import credential_env

LOOPBACK = "127.0.0.1"
# Ray resolves "127.0.0.1" passed as the node address to the host's outward address unless its
# cluster mode is off (the macOS/Windows default); this switch turns it off, for the driver and
# (through the environment) for every process Ray starts.
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_kwargs(address: Optional[str]) -> dict:
    """The `ray.init` keyword arguments for `address` (None: a local Ray on 127.0.0.1)."""
    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        # A cluster's workers do not inherit this process's environment: hand them the tracking
        # credentials the URI was stripped of (tracking.credentials).
        env = credential_env()
        return {"address": address, **({"runtime_env": {"env_vars": env}} if env else {}), **kwargs}
    return {"address": None, "_node_ip_address": LOOPBACK, "num_cpus": max(1, int(os.cpu_count() or 1)), **kwargs}


def init_ray(address: Optional[str] = None) -> None:
    """Start a local Ray bound to 127.0.0.1, or join the cluster at `address`; no-op if Ray is up."""
    import ray

    if ray.is_initialized():
        return
    if not address:
        os.environ[_LOCAL_ONLY_ENV] = "0"
        from ray._private import ray_constants  # read at import time; the env above is for child processes

        ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(**init_kwargs(address))
