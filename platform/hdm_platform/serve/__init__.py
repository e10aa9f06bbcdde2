"""HTTP inference with Ray Serve.

One module per concern, in request order:

* ``settings``: the application's typed args (tasks and their models, limits, API keys);
* ``app``: the application builder and the ingress deployment (Ray);
* ``api``: the FastAPI routes the ingress serves;
* ``uploads``, ``auth``, ``errors``, ``metrics``: what the routes share;
* ``deployments``: the per-task model deployment (Ray): loading, batching, reload;
* ``control``: deploy, inspect, reload and remove applications (``hdm serve``).
"""
