"""`@fail_fast`: a flow step stops at once on an error that no retry can fix.

Metaflow's `@retry` reruns a failed step whatever went wrong. A bad input file, a bad
parameter or a model file that fails its checksum fails the same way every time, so
retrying only repeats the traceback. Under `@fail_fast` such an error prints one line
(the message names the file, column and row) and ends the task with Metaflow's
"do not retry" exit code; the run stops with a non-zero exit. Network and service
errors are retried as before, after one line naming the setting behind the service
(`BATCHSCORE_REDIS_URL (redis://…): connection refused`), ahead of the traceback.

The exit code is honoured by Metaflow's local scheduler; Kubernetes and Argo Workflows
retry by their own retry strategy, so there a deterministic error is repeated
`BATCHSCORE_STEP_RETRIES` times before the run fails.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from metaflow.exception import METAFLOW_EXIT_DISALLOW_RETRY

from metaflow import user_step_decorator


def deterministic() -> tuple[type[BaseException], ...]:
    """InputError and bad parameters are ValueErrors; a model that fails its SHA-256 check
    (`models.IntegrityError`) will fail it again, and a run superseded by a newer one
    (`publishing.SupersededRun`) is over. Those errors are only raised once their modules
    are imported, so they are looked up, not imported: importing `batchscore.training.models`
    here would cost every step scikit-learn's import."""
    found: list[type[BaseException]] = [ValueError]
    for module, name in (
        ("batchscore.training.models", "IntegrityError"),
        ("batchscore.batch.publishing", "SupersededRun"),
    ):
        if loaded := sys.modules.get(module):
            found.append(getattr(loaded, name))
    return tuple(found)


@user_step_decorator
def fail_fast(step_name: str, flow: Any, inputs: Any = None, attributes: Any = None) -> Iterator:
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, deterministic()):
            _name_the_service(step_name, exc)
            raise
        print(f"{step_name} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(METAFLOW_EXIT_DISALLOW_RETRY)


def _name_the_service(step_name: str, exc: BaseException) -> None:
    """Before a service error's traceback (and Metaflow's retry), the setting to check."""
    try:
        from batchscore.orchestration.preflight import service_failure

        line = service_failure(exc)
    except Exception:  # only a hint: never hide the error itself
        return
    if line:
        print(f"{step_name}: {line}", file=sys.stderr, flush=True)
