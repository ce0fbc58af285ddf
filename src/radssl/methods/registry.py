"""Method registry: adding a method = one module + one line in ``METHODS``.

Entries are import paths so that importing the registry stays cheap and a broken optional method cannot break
the others.
"""

from __future__ import annotations

from radssl.methods.base import MethodParams, SSLMethod
from radssl.models.base import Backbone
from radssl.registry import Registry

METHODS: Registry[SSLMethod] = Registry("method", base=SSLMethod, entries={
    "simclr": "radssl.methods.simclr:SimCLR",
    "byol": "radssl.methods.byol:BYOL",
    "moco_v2": "radssl.methods.moco_v2:MoCoV2",
    "moco_v3": "radssl.methods.moco_v3:MoCoV3",
    "simsiam": "radssl.methods.simsiam:SimSiam",
    "barlow_twins": "radssl.methods.barlow_twins:BarlowTwins",
    "vicreg": "radssl.methods.vicreg:VICReg",
    "dino": "radssl.methods.dino:DINO",
    "mae": "radssl.methods.mae:MAE",
    "models_genesis": "radssl.methods.genesis:ModelsGenesis",
    "convirt": "radssl.methods.convirt:ConVIRT",
    "clip": "radssl.methods.clip:CLIP",
})


method_class = METHODS.load
"""The class registered under a name; :class:`~radssl.registry.UnknownNameError` (did-you-mean) otherwise."""


def validate_params(name: str, params: dict) -> MethodParams:
    """Validate a method's hyper-parameters (raises pydantic.ValidationError naming bad keys)."""
    return method_class(name).Params(**params)


def build_method(name: str, backbone: Backbone, params: dict | MethodParams) -> SSLMethod:
    cls = method_class(name)
    if not isinstance(params, MethodParams):
        params = cls.Params(**params)
    return cls(backbone, params)
