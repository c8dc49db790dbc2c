"""Tenki's own wire (gRPC, ``tenki.sandbox.v1``), so the official Tenki SDKs work unmodified.

``server.GrpcServer`` is the listener; ``sandbox.SandboxService`` the control plane,
``dataplane.DataPlane`` exec and files, ``credentials`` the data plane's session credentials,
``status`` the one table of our errors as gRPC statuses, ``convert`` records as messages,
``proto`` the descriptors the messages come from.
"""
