"""Names the app's modules and its clients share: the Ray namespace, the deployment names, model ids."""

NAMESPACE = "orchestrator"
"""Ray namespace of the detached weights holders."""
INGRESS_DEPLOYMENT = "V2Ingress"
CONTROLLER_DEPLOYMENT = "RolloutController"


def model_id(model: str, version: int) -> str:
    """The id of a version in routing tables and signatures (registry names never hold ':')."""
    return f"{model}:{version}"
