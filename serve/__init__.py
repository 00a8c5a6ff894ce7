"""The Ray Serve application: registry models behind the Open Inference Protocol v2 (REST), and language
models behind OpenAI-compatible /v1/completions (server-sent-event streaming).

The app is two deployments, and a request crosses one of them:
  V2Ingress          (ingress.py) the autoscaled serving replicas: FastAPI front (API keys, validation
                     against the manifest's signature, limits, routing by name, version, alias and
                     canary split, metrics; bad input is a 4xx JSON error, never a 5xx) that runs the
                     model itself: an LRU of loaded versions (models.py), each with adaptive batching
                     (batching.py: alone runs at once, concurrent requests share a pass).
  RolloutController  (controller.py) one replica owning the routing table (stable, candidate, split),
                     the admin actions, automatic rollback and the weights refs; off the request path:
                     serving replicas sync with it twice a second.
In front, HAProxy sends each request straight to a replica's own HTTP server (Serve's direct
ingress; orchestrator.runtime.SERVE_ENV turns it on) and resends what a dying replica cut off.

Weights are put once in the object store by a detached holder actor per version (weights.py); every
replica reads that copy zero-copy. A new version reaches running replicas as a new object ref:
no replica restarts.

The rest:
  app.py          build_app (binds the deployments) and app_builder, the entry of Serve config files
  deploy.py       run_deploy and DeployResult: deploy on the connected Ray, wait until ready
  config_file.py  serve_config / write_serve_config: the YAML `serve run`, `serve deploy` and a RayService take
  protocol.py     v2 request and response bodies (pure)     auth.py     API keys, hashed on the storage root
  rollout.py      routing table and rollback policy (pure)  metrics.py  Prometheus metrics per model and version
  calls.py        answers across handles, timeouts          errors.py   every error as JSON
  names.py        namespace, deployment names, model ids
  openai.py       /v1 request parsing, answers, SSE chunks and OpenAI's error body (pure)
  generation.py   a language model's engine: KV cache, continuous batching, sampling, stop strings
A client of a running app (HTTP only, no Ray) is `orchestrator.client`.
"""
