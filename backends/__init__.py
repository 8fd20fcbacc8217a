"""Vendor folders. Each subpackage registers its Platform and implementations with ``hal`` on import."""
