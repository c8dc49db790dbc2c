"""Exposed guest ports: the preview proxy (``proxy``) and the HTTP it reads (``http``)."""

from .proxy import Exposure, PreviewProxy, PreviewSettings, tls_context

__all__ = ["Exposure", "PreviewProxy", "PreviewSettings", "tls_context"]
