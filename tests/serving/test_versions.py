"""A deployment's version is its code and its arguments (serving.app.pinned): a new checkpoint (the
user_config) keeps it, so Serve reconfigures the running replicas in place instead of restarting
every replica of every application on each ``start``."""

from __future__ import annotations

from unusual.serving.app import applications

from unusual.config import ServeConfig


def _versions(config: ServeConfig) -> dict[str, str]:
    out = {}
    for target in applications(config):
        deployment = target.target._bound_deployment
        out[target.name] = deployment.version
    return out


def test_a_new_checkpoint_keeps_every_version_and_other_arguments_change_them():
    base = ServeConfig(models={"ae": "/b/ae-1", "vae": "/b/vae-1"}, num_cpus=0.2)
    first = _versions(base)
    assert set(first) == {"unusual", "unusual-ae", "unusual-vae"} and all(first.values())
    assert _versions(base) == first  # deterministic
    swapped = ServeConfig.model_validate({**base.model_dump(), "models": {"ae": "/b/ae-2", "vae": "/b/vae-1"}})
    assert _versions(swapped) == first  # only the user_config changed
    bigger = ServeConfig.model_validate({**base.model_dump(), "max_batch_size": 8})
    assert all(_versions(bigger)[name] != first[name] for name in first)  # the replicas' arguments changed
