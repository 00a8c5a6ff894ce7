"""Orchestrator: PyTorch on Ray from data to an autoscaled HTTP endpoint.

A driver script needs only this module:

    import orchestrator as orc
    cfg = orc.PipelineConfig(train=orc.TrainConfig(epochs=5), serve=orc.ServeConfig(block=False))
    with orc.connected(cfg):
        result = orc.run_pipeline(cfg)
    print(result.summary())

Names are imported on first use, so `import orchestrator.config` stays light (no Ray, no torch).
"""

from orchestrator._lazy import lazy_exports

_EXPORTS = {
    "orchestrator.config": [
        "CompareConfig", "DataConfig", "ExportConfig", "ModelConfig", "OptimizeConfig", "ParallelConfig", "PhaseConfig",
        "PipelineConfig", "RegistryConfig", "ScalingConfig", "ScheduleConfig", "ServeConfig", "StorageConfig",
        "TrackingConfig", "TrainConfig", "TuneConfig", "to_config", "to_dict",
    ],
    "orchestrator.training.compare": ["CompareResult", "run_compare"],
    "orchestrator.training.schedules": ["Phase", "expand_schedule"],
    "orchestrator.training.data": ["DatasetInfo", "load_split", "prepare_dataset"],
    "orchestrator.kuberay.manifests": ["validate_manifest", "write_manifests"],
    "orchestrator.optimize.run": ["OptimizeResult", "run_optimize"],
    "orchestrator.training.models": ["StagedModel", "build_model"],
    "orchestrator.flows": ["PipelineResult", "connected", "register_run", "register_sweep", "run_pipeline"],
    "orchestrator.registry.store": ["IntegrityError", "ModelRegistry", "ModelVersion", "RegistryError"],
    "serve.app": ["build_app"],
    "serve.deploy": ["DeployResult", "run_deploy"],
    "orchestrator.client": ["check_endpoint"],
    "orchestrator.training.sweep": ["SweepResult", "run_sweep"],
    "orchestrator.training.loop": ["TrainResult", "run_train"],
}
__all__, __getattr__, __dir__ = lazy_exports("orchestrator", _EXPORTS, globals())
