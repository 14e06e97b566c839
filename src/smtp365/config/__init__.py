"""Configuration: the settings model, its loader and ``config check``."""

from smtp365.config.check import Finding, Level, check
from smtp365.config.loader import find_config, load
from smtp365.config.model import (
    PROFILES,
    Account,
    AccountSettings,
    AuthMethod,
    Flow,
    Profile,
    Settings,
    TLSMode,
)

__all__ = [
    "PROFILES",
    "Account",
    "AccountSettings",
    "AuthMethod",
    "Flow",
    "Finding",
    "Level",
    "Profile",
    "Settings",
    "TLSMode",
    "check",
    "find_config",
    "load",
]
