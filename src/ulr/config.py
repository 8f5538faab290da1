"""``ulr.config`` is :mod:`ulr.train.config` (with the TOML files of
:mod:`ulr.train.config_file`): the run configuration moved into the training package; this name
stays for existing imports."""

from .train.config import *  # noqa: F403
from .train.config import __all__ as _config_all
from .train.config_file import load_toml, parse_value, to_toml

__all__ = [*_config_all, "load_toml", "parse_value", "to_toml"]
