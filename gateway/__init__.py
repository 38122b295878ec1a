"""The SVP gateway: REST ``/svp/runs`` and ``/isvp/caption`` in front of the Celery coordinator.

* :mod:`gateway.app` — the FastAPI router (auth, errors) over :mod:`gateway.runs` (the domain logic);
* :mod:`gateway.coordinator` — the Celery tasks of a run; :mod:`gateway.celery_app` — app factory, task names;
* :mod:`gateway.inner_loop` — SVP's per-image loop over the model services' typed clients;
* :mod:`gateway.store` — run records, per-image results and events in Redis;
* :mod:`gateway.artifacts` — a run's files; :mod:`gateway.settings` — ``SVP_GATEWAY_*``.
"""
