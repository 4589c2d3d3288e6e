"""Engine replicas on Ray Serve (``pip install 'hf_delta[ray]'``; see docs/ray.md).

``hf_delta.serving.ray:app_builder`` is the import path Serve config files name; it stays here.
"""

from .deployment import (
    AFFINITY_HEADER,
    APP_NAME,
    REPLICA_HEADER,
    RESIDENCY_HEADER,
    DeltaRouter,
    EngineReplica,
    app_builder,
    build_app,
    start_ray,
)

__all__ = ["AFFINITY_HEADER", "APP_NAME", "REPLICA_HEADER", "RESIDENCY_HEADER", "DeltaRouter", "EngineReplica",
           "app_builder", "build_app", "start_ray"]
