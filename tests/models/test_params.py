"""The parameter tree (unusual.models.params): one declaration per parameter, from which the checks,
the scikit-learn estimators and the README's table come."""

from dataclasses import fields

import pytest
from unusual.models import Detector
from unusual.models.params import estimator_parameters, groups, tree
from unusual.models.registry import family, kinds


@pytest.mark.parametrize("kind", kinds())
def test_every_parameter_is_declared_with_its_meaning(kind):
    for cls in groups(kind).values():
        undeclared = [f.name for f in fields(cls) if not f.metadata.get("help")]
        assert not undeclared, f"{cls.__name__}: fields without param(help=...): {undeclared}"


@pytest.mark.parametrize(
    "params, message",
    [
        ({"dropout": 1.5}, "dropout must be in [0, 1); got 1.5"),
        ({"lr": 0}, "lr must be > 0; got 0"),
        ({"contamination": 0.5}, "contamination must be in (0, 0.5); got 0.5"),
        ({"latent": 0}, "latent must be >= 1; got 0"),
        ({"scaling": "minmax"}, "scaling must be one of ('standard', 'robust', 'none'); got 'minmax'"),
        ({"norm": "batch"}, "norm must be one of ('layer', None); got 'batch'"),
    ],
)
def test_a_value_out_of_its_declared_range_is_an_error_naming_it(params, message):
    with pytest.raises(ValueError) as e:
        Detector("ae", **params)
    assert str(e.value) == message


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_the_estimators_parameters_and_defaults_are_the_detectors(kind):
    from unusual.sklearn import AutoencoderDetector, VAEDetector

    est = {"ae": AutoencoderDetector, "vae": VAEDetector}[kind]()
    params = est.get_params()
    assert set(params) == {p.name for p in estimator_parameters(kind)} | {"threshold_on", "verbose"}
    trained = {p.name: p.default for p in tree(kind)}  # with the family's train_defaults
    assert trained["epochs"] == family(kind).train_defaults["epochs"] == params["epochs"]
    for name, value in params.items():
        source = {"score_type": "score"}.get(name, name)
        if source in trained:
            expected = trained[source]
            assert value == (tuple(expected) if isinstance(expected, list) else expected), name


def test_the_estimators_constraints_come_from_the_declared_bounds():
    from sklearn.utils._param_validation import InvalidParameterError

    from unusual.sklearn import AutoencoderDetector

    with pytest.raises(InvalidParameterError, match=r"The 'lr' parameter of AutoencoderDetector must be"):
        AutoencoderDetector(lr=0.0).fit([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
        AutoencoderDetector(epoch=3)
