"""Calls between the app's deployments over Serve handles: how an answer crosses a handle, how long
the ingress waits for one, and which failures it sends again.

The ingress imports everything its methods use from here (and other modules), none of it from its
own module: `@serve.ingress` copies the class when it is decorated, with the globals as they are then.
"""

from typing import Any, Awaitable, Callable, Dict

from ray.exceptions import RayActorError, RayTaskError

from orchestrator.registry import IntegrityError, RegistryError
from serve.protocol import BadRequest
from serve.rollout import RolloutError

READY_TIMEOUT_S = 5.0
"""How long a readiness probe waits for the controller and a model replica."""
REPLICA_DEATH_RETRIES = 2
"""Times the ingress sends an infer request again when the model replica holding it died."""


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


def replica_died(err: BaseException) -> bool:
    """Whether a model call failed because its replica process died or became unreachable.

    A RayTaskError is the replica's own code failing, even one that wraps an actor error (a call
    the replica made to another actor): the replica lived, and sending the request again would
    fail the same way.
    """
    return isinstance(err, RayActorError) and not isinstance(err, RayTaskError)
