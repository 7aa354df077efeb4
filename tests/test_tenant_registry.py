"""TenantRegistry.sync on a stand-in host (no model): what it does with a tenant SGLang
serves but the trainer could not create."""

from __future__ import annotations

from types import SimpleNamespace

from mace_sgl.trainer.tenants import TenantRegistry


def registry(served: dict[str, str], broken: set[str]) -> tuple[TenantRegistry, list]:
    """A registry whose tenants are created by a stand-in that fails for uids in `broken`."""
    reg = object.__new__(TenantRegistry)
    reg.tenants, reg.create_failures, reg._failed_uid = {}, {}, {}
    reg.host = SimpleNamespace(tenant_names=lambda: dict(served))
    tried: list[tuple[str, str]] = []

    def create(name: str, uid: str) -> None:
        tried.append((name, uid))
        if uid in broken:
            raise RuntimeError(f"{name} is broken")
        reg.tenants[name] = SimpleNamespace(uid=uid)

    reg._create = create
    return reg, tried


def test_a_failed_tenant_is_tried_again_when_sglang_loads_it_again_and_forgotten_when_gone():
    """A failed creation is not retried every poll while SGLang serves that same load of
    the name, but a retire and create again (a new load: another uid) is tried afresh,
    and a name SGLang no longer serves leaves the failures (they were kept for good: the
    name could never train again in this process, and the map grew with every name)."""
    served = {"a": "a1", "b": "b1"}
    reg, tried = registry(served, broken={"a1", "b1"})
    assert reg.sync() == ([], [])
    assert reg.create_failures == {
        "a": "RuntimeError: a is broken",
        "b": "RuntimeError: b is broken",
    }
    assert reg.sync() == ([], []) and len(tried) == 2  # the same loads: not tried again
    served["a"] = "a2"  # retired and created again: SGLang loaded a new adapter
    del served["b"]  # retired
    assert reg.sync() == (["a"], [])
    assert tried[2:] == [("a", "a2")] and reg.create_failures == {} and reg._failed_uid == {}
