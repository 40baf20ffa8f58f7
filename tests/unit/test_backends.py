"""Every registered backend implements the whole Backend interface, and its Guest the whole Guest interface."""

from __future__ import annotations

import inspect

import pytest

from bottle_tasks.backends import BACKENDS, backend_class
from bottle_tasks.backends.base import Backend, Guest
from bottle_tasks.docker_cli import Docker
from bottle_tasks.plan import make_plan
from bottle_tasks.settings import ROOT
from bottle_tasks.spec import SpecError, load_spec
from tests.unit.fakes import FakeRunner
from tests.unit.test_plan import settings


def _interface(base: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in inspect.getmembers(base)
            if getattr(member, "__isabstractmethod__", False)}


def _compatible(base: inspect.Signature, impl: inspect.Signature) -> bool:
    """impl accepts every call base accepts: the same parameters by name and kind; extras only with defaults."""
    impl_params = impl.parameters
    for name, param in base.parameters.items():
        if name not in impl_params or impl_params[name].kind != param.kind:
            return False
    return all(p.default is not p.empty or name in base.parameters for name, p in impl_params.items())


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_the_backend_implements_every_method(name, tmp_path):
    cls = backend_class(name)
    assert issubclass(cls, Backend) and cls.name == name
    assert not inspect.isabstract(cls), f"{cls.__name__} leaves abstract: {sorted(cls.__abstractmethods__)}"
    for method, signature in _interface(Backend).items():
        assert _compatible(signature, inspect.signature(getattr(cls, method))), f"{cls.__name__}.{method}"
    plan = make_plan(load_spec(ROOT / "agents" / "example.yaml"), settings(tmp_path, BOTTLE_BACKEND=name))
    assert plan.backend == name
    guest = cls(Docker(FakeRunner())).guest(plan)
    assert isinstance(guest, Guest) and not inspect.isabstract(type(guest))
    for method, signature in _interface(Guest).items():
        assert _compatible(signature, inspect.signature(getattr(type(guest), method))), f"{type(guest).__name__}.{method}"


def test_an_unregistered_backend_is_refused_with_the_registered_ones(tmp_path):
    path = tmp_path / "pod.yaml"
    path.write_text("backend: podman\n")
    with pytest.raises(SpecError, match="backend: 'podman' is not a backend. Use docker or smolmachines"):
        load_spec(path)
