"""Hardware-abstraction layer: the Platform and the registries of implementations by role."""
from hal.platform import DeviceUnavailableError, Platform, get_platform, register_platform
from hal.registry import BackendSelectionError, register, select

__all__ = ["DeviceUnavailableError", "Platform", "get_platform", "register_platform",
           "BackendSelectionError", "register", "select"]
