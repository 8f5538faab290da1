"""Config files of ``ulr train``: flat TOML read into checked values (:func:`load_toml`), a
:class:`~ulr.train.RunConfig` written back (:func:`to_toml`), and command-line values parsed as
TOML (:func:`parse_value`). The format is described in :mod:`ulr.train.config`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .config import TABLES, ConfigError, RunConfig, check_values, configs_from_values, keys, reads

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the `tomli` backport
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

__all__ = ["load_toml", "parse_value", "to_toml"]


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read and validate a TOML config file.

    Args:
        path: the file.

    Returns:
        Its values, checked by :func:`check_values` (``method`` may be a list).

    Raises:
        ConfigError: a missing file, a TOML syntax error, an unknown key or a bad value.
    """
    path = Path(path)
    if tomllib is None:
        raise ConfigError(
            "reading TOML on Python 3.10 needs the tomli package: "
            "pip install -c constraints/cpu.txt 'ulr[train]' (or pip install tomli)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for key, value in values.items():
        if isinstance(value, dict) and key.replace("-", "_") not in TABLES:
            raise ConfigError(
                f"{path}: unexpected table [{key}]; config files are flat apart from "
                f"{', '.join(f'[{t}]' for t in TABLES)}; valid keys: {', '.join(keys())}"
            )
    return check_values(values, str(path))


def parse_value(text: str) -> Any:
    """Parse a command-line value as TOML (``3``, ``[256, 128]``, ``"tanh"``); bare words are
    strings (``tanh``)."""
    if tomllib is not None:
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            pass
    return text


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    """A bare TOML key where it may be one, else quoted (``"hidden.*"``: a dot would nest)."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _exact(config: RunConfig, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (some of ``config``'s), with ``model_defaults = false`` where reading them
    back would give an unset key the model's own default instead of ``config``'s value (a
    config built in Python takes the fields' defaults only)."""
    given = {k: v for k, v in values.items() if v is not None and v != {}}
    if configs_from_values({**given, "method": config.method}) != [config]:
        values = {**values, "model_defaults": False}
    return values


def to_command(config: RunConfig, command: str = "train") -> str:
    """The shortest ``ulr train`` command line that runs ``config``: the model, data and
    method, and every other key whose value differs from the field's default (plus
    ``--no-model-defaults`` where the model's own defaults would change an unset key).

    Example:
        >>> to_command(RunConfig(model="lenet5", data="fashion-mnist", epochs=2))
        'ulr train --method ulr --model lenet5 --data fashion-mnist --epochs 2 --no-model-defaults'
    """
    import shlex

    base = RunConfig().to_dict()
    # options the method does not read change nothing, and the command line refuses them
    config = config.replace(**{k: base[k] for k in base if not reads(config.method, k)})
    values = {k: v for k, v in config.to_dict().items()
              if k in ("model", "data", "method") or (v != base[k] and k != "model_defaults")}
    values = _exact(config, values)
    return shlex.join(["ulr", command, "--method", values.pop("method"), *flag_args(values)])


_TABLE_FLAGS = {"model_args": "--model-arg", "method_args": "--method-arg",
                "site_sigma": "--site-sigma"}


def flag_args(values: dict[str, Any]) -> list[str]:
    """Config values as ``ulr train`` arguments (``["--sites", "pool1", "pool2",
    "--num-copies", "64"]``); unset (``None``) values are left out."""
    parts: list[str] = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if key in _TABLE_FLAGS:
            for k, v in value.items():
                parts += [_TABLE_FLAGS[key],
                          f"{k}={_toml_value(v) if not isinstance(v, str) else v}"]
        elif isinstance(value, bool):
            parts.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]
        elif value is not None:
            parts += [flag, str(value)]
    return parts


def to_toml(config: RunConfig, header: str = "") -> str:
    """The config as a TOML file that :func:`load_toml` reads back to the same config.

    Unset (``None``) fields are written as comments.
    """
    lines = [f"# {line}" for line in header.splitlines()]
    values = _exact(config, config.to_dict())
    tables = {name: values.pop(name) for name in TABLES}
    for key, value in values.items():
        lines.append(f"# {key} = (unset)" if value is None else f"{key} = {_toml_value(value)}")
    for name, table in tables.items():
        lines.append("")
        lines.append(f"[{name}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"
