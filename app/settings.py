"""Service settings (`PROMPTPIX_*`): the one `Settings` shared with the workers.

Defined in the torch-free `worker.protocol` because workers may not import `app`.
"""

from worker.protocol.settings import Settings, get_settings

__all__ = ["Settings", "get_settings"]
