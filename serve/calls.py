"""Calls between the app's deployments over Serve handles: how an answer crosses a handle, how long
the ingress waits for one, and which failures it sends again.

The ingress imports everything its methods use from here (and other modules), none of it from its
own module: `@serve.ingress` copies the class when it is decorated, with the globals as they are then.
"""

import asyncio
import sys
from typing import Any, Awaitable, Callable, Dict, TypeVar

from orchestrator.registry import IntegrityError, RegistryError
from serve.protocol import BadRequest
from serve.rollout import RolloutError

READY_TIMEOUT_S = 5.0
"""How long a readiness probe waits for the controller."""


def to_answer(action: Callable[[], Any]) -> Dict[str, Any]:
    """Run a controller action: {"result": ...}, or {"error", "status"} for the ingress to answer
    (an exception crossing a handle would lose its HTTP meaning)."""
    try:
        return {"result": action()}
    except IntegrityError as err:  # before RegistryError, its base: a tampered file is our fault
        return {"error": str(err), "status": 500}
    except RegistryError as err:
        return {"error": str(err), "status": 404}
    except RolloutError as err:
        return {"error": str(err), "status": 409}


def from_answer(answer: Dict[str, Any]) -> Any:
    """The result of a `to_answer` answer. Raises BadRequest with its status when it holds an error."""
    if "error" in answer:
        raise BadRequest(answer["status"], answer["error"])
    return answer["result"]


async def awaited(response: Awaitable[Any]) -> Any:
    """`response` awaited, as a coroutine (for `asyncio.wait_for`)."""
    return await response


T = TypeVar("T")


async def within(timeout_s: float, work: Awaitable[T]) -> T:
    """`work` awaited; asyncio.TimeoutError past `timeout_s`. On Python 3.11+ without a new task
    (asyncio.timeout), which matters on the infer path: wait_for's task costs tens of microseconds."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout_s):
            return await work
    return await asyncio.wait_for(work, timeout_s)
