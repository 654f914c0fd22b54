"""Helpers shared by the Ray programs in ``pipelines/``.

- :func:`ensure_repo_on_path` lets ``python pipelines/<prog>.py`` run from the repository root
  (``sys.path[0]`` is then ``pipelines/``, so neither ``diffurec`` nor ``pipelines`` would import
  without an installed package). Ray copies the driver's ``sys.path`` to its local workers, so
  they can import ``pipelines.*`` too; on a cluster the runtime_env ``working_dir`` does it.
- :func:`init_ray` starts or joins Ray explicitly (never a bare ``ray.init()``, which follows a
  stale "current cluster" file and tries to join a dead cluster).
- :func:`run_cli` turns a :class:`diffurec.errors.DiffuRecError` into one ``error: ...`` line on
  stderr and exit status 2.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def ensure_repo_on_path() -> None:
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


def new_run_name(prefix: str = "diffurec") -> str:
    """A name no earlier run has: a reused Ray Train run name silently resumes that run."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def ray_address() -> str | None:
    """The cluster to join (``RAY_ADDRESS``, set by ``ray job submit`` and RayJobs), or None."""
    return os.environ.get("RAY_ADDRESS") or None


def init_ray(**kwargs) -> bool:
    """Join ``RAY_ADDRESS`` when set, else start a fresh local Ray; returns True if it started
    (or connected) Ray here, False when Ray was already initialised in this process.

    Token authentication: Ray 2.60 turns ``RAY_AUTH_MODE=token`` on by default for a new local
    cluster and writes ``~/.ray/auth_token`` if missing; the driver and its workers share it, so
    nothing needs doing here. To join a cluster that uses tokens, set ``RAY_AUTH_TOKEN`` (or
    ``RAY_AUTH_TOKEN_PATH``); ``RAY_AUTH_MODE=disabled`` opts a local cluster out.
    """
    import ray

    if ray.is_initialized():
        return False
    address = ray_address()
    if address:
        ray.init(address=address, **kwargs)
    else:
        # the dashboard serves the state API that Ray Train's placement-group cleanup (and
        # Train-inside-Tune) relies on; loopback only
        kwargs.setdefault("include_dashboard", True)
        kwargs.setdefault("dashboard_host", "127.0.0.1")
        ray.init(address="local", **kwargs)
    return True


def print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def run_cli(fn, argv: list[str] | None = None) -> int:
    """Call ``fn(argv)``; a DiffuRecError becomes one ``error:`` line and exit status 2."""
    from diffurec.errors import DiffuRecError

    try:
        return fn(argv)
    except DiffuRecError as exc:
        print_error(str(exc))
        return 2
