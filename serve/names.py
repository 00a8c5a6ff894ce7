"""Names the app's modules and its clients share: the Ray namespace, the deployment names, model ids."""

from typing import Tuple

NAMESPACE = "orchestrator"
"""Ray namespace of the detached weights holders."""
MODEL_DEPLOYMENT = "ModelServer"
INGRESS_DEPLOYMENT = "V2Ingress"
CONTROLLER_DEPLOYMENT = "RolloutController"


def model_id(model: str, version: int) -> str:
    """The multiplexed model id of a version (registry names never hold ':')."""
    return f"{model}:{version}"


def split_model_id(mid: str) -> Tuple[str, int]:
    """(model, version) of a multiplexed model id made by `model_id`."""
    model, _, version = mid.rpartition(":")
    return model, int(version)
