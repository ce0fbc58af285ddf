"""One registry shape for every plugin table: register, list with a filter, look up with a did-you-mean error."""

from __future__ import annotations

import pytest

from radssl.methods.registry import METHODS, method_class
from radssl.models.registry import BACKBONE_FAMILIES, backbone_class
from radssl.registry import Registry, UnknownNameError, did_you_mean
from radssl.transfer.protocols.base import PROTOCOLS, protocol_class
from radssl.views.pairing import PAIRINGS, pairing_class
from radssl.views.policies import POLICIES, policy_class


class _Plugin:
    name = "plugin"
    dims = 3


def test_register_names_and_load() -> None:
    table: Registry[object] = Registry("widget", {"lazy": "radssl.registry:Registry"})
    assert table.register(_Plugin) is _Plugin  # decorator form returns the class
    table.register(name="alias")(_Plugin)
    assert table.names() == ["lazy", "plugin", "alias"]
    assert table.load("lazy") is Registry  # imported on first use
    assert table.names(where=lambda cls: getattr(cls, "dims", 2) == 3) == ["plugin", "alias"]


def test_every_table_fails_the_same_way_with_the_closest_spelling() -> None:
    lookups = [(METHODS, method_class, "simclrr", "simclr"), (BACKBONE_FAMILIES, backbone_class, "resnet19", "resnet18"),
               (POLICIES, policy_class, "two_veiw", "two_view"), (PAIRINGS, pairing_class, "patinet", "patient"),
               (PROTOCOLS, protocol_class, "linaer", "linear")]
    for table, lookup, typo, meant in lookups:
        with pytest.raises(UnknownNameError) as caught:
            lookup(typo)
        message = str(caught.value)
        assert message.startswith(f"unknown {table.kind} '{typo}' — did you mean '{meant}'?"), message
        assert isinstance(caught.value, KeyError) and isinstance(caught.value, ValueError)


def test_backbones_list_by_dimensionality() -> None:
    three_d = BACKBONE_FAMILIES.names(where=lambda cls: 3 in cls.spatial_dims_supported)
    assert "resnet18_3d" in three_d and "resnet18" not in three_d


def test_a_table_with_a_base_class_refuses_anything_else_where_it_is_registered_or_loaded() -> None:
    table: Registry[Registry] = Registry("widget", {"wrong": "radssl.registry:UnknownNameError"}, base=Registry)
    with pytest.raises(TypeError, match="a widget must be a Registry subclass"):
        table.register(_Plugin)
    with pytest.raises(TypeError, match="a widget must be a Registry subclass"):
        table.load("wrong")
    assert "plugin" not in table


def test_every_lookup_function_is_its_tables_own_method() -> None:
    """No bespoke lookup code beside the Registry: the modules' lookup names are the tables' bound methods."""
    from radssl.transfer.protocols import protocol_names, register_protocol
    from radssl.views.policies import register_policy

    for table, lookup in [(METHODS, method_class), (BACKBONE_FAMILIES, backbone_class), (POLICIES, policy_class),
                          (PAIRINGS, pairing_class), (PROTOCOLS, protocol_class)]:
        assert lookup.__self__ is table and lookup.__func__ is Registry.load, table.kind
        assert table.base is not None and all(issubclass(table.load(name), table.base) for name in table)
    assert register_protocol.__self__ is PROTOCOLS and register_policy.__self__ is POLICIES
    assert protocol_names() == list(PROTOCOLS)


def test_did_you_mean() -> None:
    assert did_you_mean("linaer", ["linear", "knn"]) == " — did you mean 'linear'?"
    assert did_you_mean("zzz", ["linear", "knn"]) == ""
