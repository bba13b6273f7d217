"""vtoken: token-efficiency plugins for Hugging Face vision-language models.

Attach plugins to an unmodified transformers VLM in one line; detach to get the original back::

    import vtoken
    with vtoken.attach(model, "token_pruning") as session:
        out = model.generate(**inputs, max_new_tokens=32)
        print(session.report().format())
"""

from vtoken.cache import PrunableLayer, VTokenCache
from vtoken.config import PluginConfig, check_choice, check_range
from vtoken.errors import (
    AlreadyAttachedError,
    ConfigError,
    PluginNotFoundError,
    UnsupportedInputError,
    UnsupportedModelError,
    VTokenError,
)
from vtoken.families import FAMILIES, FamilySpec, ModelParts, locate_parts, resolve_family
from vtoken.layout import VisualLayout
from vtoken.metrics import Report
from vtoken.plugin import Plugin
from vtoken.probe import Probe, ProbeSpec
from vtoken.registry import available_plugins, create_plugin, create_plugins, register_plugin
from vtoken.runtime import PruneView
from vtoken.session import Session, active_session, attach
from vtoken.state import RunState

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "AlreadyAttachedError",
    "ConfigError",
    "FamilySpec",
    "ModelParts",
    "Plugin",
    "PluginConfig",
    "Probe",
    "ProbeSpec",
    "PrunableLayer",
    "PruneView",
    "PluginNotFoundError",
    "Report",
    "RunState",
    "Session",
    "UnsupportedInputError",
    "UnsupportedModelError",
    "VTokenCache",
    "VTokenError",
    "VisualLayout",
    "active_session",
    "attach",
    "available_plugins",
    "check_choice",
    "check_range",
    "create_plugin",
    "create_plugins",
    "locate_parts",
    "register_plugin",
    "resolve_family",
]
