"""Tenki's wire messages, loaded from the descriptors its published SDKs carry.

``tenki-sandbox-v1.binpb`` is the ``FileDescriptorSet`` of ``tenki.sandbox.v1`` (and its
dependencies) as embedded in the MIT-licensed PyPI package ``tenki`` 1.4.1. Loading it into a
private pool at run time, instead of generating modules, keeps the wire contract one file that
is compared byte for byte with what the SDKs ship, and keeps our messages apart from the SDK's
own registrations when both live in one process (the conformance tests).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

PACKAGE = "tenki.sandbox.v1"
CONTROL = f"{PACKAGE}.SandboxService"
DATA_PLANE = f"{PACKAGE}.SandboxSessionDataPlaneService"


@cache
def pool() -> descriptor_pool.DescriptorPool:
    raw = resources.files(__package__).joinpath("tenki-sandbox-v1.binpb").read_bytes()
    files = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(raw).file}
    p = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:  # a file goes in after the files it imports
        if name in added:
            return
        for dep in files[name].dependency:
            add(dep)
        p.Add(files[name])
        added.add(name)

    for name in files:
        add(name)
    return p


@cache
def message(name: str) -> Any:
    """The message class of ``name`` (``tenki.sandbox.v1.`` may be left out)."""
    full = name if "." in name else f"{PACKAGE}.{name}"
    return message_factory.GetMessageClass(pool().FindMessageTypeByName(full))


def service(full_name: str) -> ServiceDescriptor:
    return pool().FindServiceByName(full_name)


def methods(full_name: str) -> list[MethodDescriptor]:
    return list(service(full_name).methods)


def enum_value(enum: str, name: str) -> int:
    return int(pool().FindEnumTypeByName(f"{PACKAGE}.{enum}").values_by_name[name].number)
