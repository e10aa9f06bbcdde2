"""The HDM Serve application: a FastAPI ingress in front of one model deployment per task.

``build_app`` is the typed application builder the configs in ``serve_configs/`` name
(``import_path: hdm_platform.serve.app:build_app``); ``serve run``, ``serve deploy``,
``serve build`` and ``hdm serve up`` call it with the config's ``args``, which Serve
validates as a :class:`ServeAppArgs`. Deployment options (replicas, autoscaling, GPUs,
queue limits) come from the code below unless a config's ``deployments:`` overrides them;
the deployments are named ``ingress`` and after their tasks (``dehaze``, ...).
"""

# No ``from __future__ import annotations`` here: Serve reads build_app's parameter
# annotation at run time to validate the args as a ServeAppArgs.

from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from hdm_platform.serve.api import create_api
from hdm_platform.serve.auth import load_api_keys
from hdm_platform.serve.deployments import BATCHES_IN_FLIGHT, QUEUED_BATCHES, TaskModel
from hdm_platform.serve.metrics import IngressMetrics
from hdm_platform.serve.settings import ApiKeySettings, Limits, ServeAppArgs

__all__ = ["INGRESS_DEPLOYMENT", "Ingress", "app", "build_app"]

INGRESS_DEPLOYMENT = "ingress"


@serve.deployment(
    name=INGRESS_DEPLOYMENT, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64
)
@serve.ingress()
class Ingress:
    """Decodes uploads, enforces the limits and API keys, and calls the model deployments."""

    def __init__(
        self, models: dict[str, DeploymentHandle], limits: Limits, api_keys: ApiKeySettings
    ) -> None:
        self._models = models
        self._limits = limits
        # Read once per replica; a configured key file that holds no key fails the start.
        self._api_keys = load_api_keys(api_keys)
        self._metrics = IngressMetrics()

    def __serve_build_asgi_app__(self) -> FastAPI:
        # serve.ingress() without an app (documented in its docstring) calls this after
        # __init__, so the routes close over this replica's handles, limits and keys.
        return create_api(self._models, self._limits, self._api_keys, self._metrics)


def build_app(args: ServeAppArgs) -> Application:
    """The application for ``args``: a model deployment per task, then the ingress."""
    models = {
        task: TaskModel.options(
            name=task,
            user_config=settings.model_dump(mode="json"),
            max_ongoing_requests=BATCHES_IN_FLIGHT * settings.max_batch_size,
            max_queued_requests=QUEUED_BATCHES * settings.max_batch_size,
        ).bind(task)
        for task, settings in args.tasks.items()
    }
    return Ingress.bind(models, args.limits, args.api_keys)


#: Every task's registry champion with the default settings: what ``serve run
#: hdm_platform.serve.app:app`` serves and ``serve build`` writes a config for.
app = build_app(ServeAppArgs())
