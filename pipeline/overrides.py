"""Moved to stages/overrides.py, which pipeline/ and train/ both import; this name stays for older imports."""

from stages.overrides import ConfigError, UnknownConfigKey, coerce, parse_sets, read_yaml, with_overrides  # noqa: F401
