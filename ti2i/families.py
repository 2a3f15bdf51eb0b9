"""Model families: several engine directories served side by side by one Triton server.

A *family* is one engine directory (SD 1.5 with its UNets, SVD, ...). Served alone, its models keep
their plain names (``unet``, ``encode_prompt``). Served with others, every model name carries the
family as a prefix, ``<family>.<model>`` (``sd15.unet``, ``svd.vae_encoder``), because families share
model names. This module owns that naming convention; the repository writer, the runners and the
balancer all go through it.

Why ``.``: a Triton model name is the model's folder in the repository and one segment of the
KServe v2 URL path (``/v2/models/<name>/infer``); Triton rejects only what cannot be either (a ``/``,
or a name escaping the repository such as ``..``). A dot is a legal folder name and path segment,
needs no escaping over HTTP or gRPC, and occurs in no component name (they are Python identifiers)
and in no family name (checked below), so ``sd15.unet`` splits back unambiguously at its first dot.
``_`` would not (``vae_encoder``), nor would ``-`` (a family ``svd-xt``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ti2i.errors import InvalidInputError, ModelNotFoundError
from ti2i.manifest import PIPELINE_PARAMETER

SEPARATOR = "."
# The model-config parameter naming the family a served model belongs to (absent: the one unnamed family).
FAMILY_PARAMETER = "ti2i_family"
_FAMILY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


def check_family_name(name: str) -> str:
    if not _FAMILY_NAME.fullmatch(name):
        raise InvalidInputError(f"family name {name!r} must be letters, digits, '_' or '-' (starting with a letter "
                                f"or digit, at most 63 characters)")
    return name


def served_name(family: str | None, model: str) -> str:
    """The name a family's model is served under (its plain name when the family is unnamed)."""
    return model if family is None else f"{family}{SEPARATOR}{model}"


def split_served_name(name: str) -> tuple[str | None, str]:
    """(family, plain model name) of a served name."""
    family, sep, model = name.partition(SEPARATOR)
    return (family, model) if sep else (None, name)


def parse_engine_dirs(values: Iterable[str]) -> dict[str | None, Path]:
    """``--engines DIR`` (one unnamed family: today's model names) or ``--engines NAME=DIR`` repeated."""
    values = list(values)
    dirs: dict[str | None, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            if len(values) > 1:
                raise InvalidInputError(f"--engines {value}: with several engine directories give each a family "
                                        f"name, --engines NAME=DIR (e.g. sd15=engines/sd15)")
            return {None: Path(value)}
        check_family_name(name)
        if name in dirs:
            raise InvalidInputError(f"family {name!r} is given twice in --engines")
        if not path:
            raise InvalidInputError(f"--engines {value}: the directory is missing after '='")
        dirs[name] = Path(path)
    return dirs


@dataclass(frozen=True)
class Family:
    """One family as a client sees it: its pipeline facts and the plain names of its models."""

    name: str | None
    pipeline: dict[str, Any]
    models: frozenset[str] = field(default_factory=frozenset)

    def served(self, model: str) -> str:
        return served_name(self.name, model)

    @property
    def label(self) -> str:
        return self.name or "(unnamed)"


def families_from_configs(configs: Mapping[str, Mapping[str, Any]]) -> dict[str | None, Family]:
    """Group served models (name -> model config as JSON) into families by the parameters each carries."""
    pipelines: dict[str | None, dict[str, Any]] = {}
    models: dict[str | None, set[str]] = {}
    for name, config in configs.items():
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        if PIPELINE_PARAMETER not in params:
            continue
        family = params.get(FAMILY_PARAMETER) or None
        plain = name[len(family) + len(SEPARATOR):] if family and name.startswith(family + SEPARATOR) else name
        pipelines.setdefault(family, json.loads(params[PIPELINE_PARAMETER]))
        models.setdefault(family, set()).add(plain)
    return {f: Family(f, pipelines[f], frozenset(models[f])) for f in pipelines}


def choose_family(families: Mapping[str | None, Family], needed: Iterable[str], requested: str | None = None,
                  purpose: str = "this call") -> Family:
    """The one family that serves every model in `needed` (or the `requested` one, which must)."""
    needed = list(needed)
    names = ", ".join(sorted(f.label for f in families.values()))
    if requested is not None:
        if requested not in families:
            raise ModelNotFoundError(f"no model family {requested!r} is served (families: {names})")
        family = families[requested]
        missing = [m for m in needed if m not in family.models]
        if missing:
            raise ModelNotFoundError(f"family {requested!r} lacks {missing} needed by {purpose} (families: {names})")
        return family
    able = [f for f in families.values() if all(m in f.models for m in needed)]
    if len(able) == 1:
        return able[0]
    if not able:
        raise ModelNotFoundError(f"no served model family has every model {purpose} needs ({needed}); "
                                 f"families: {names}")
    raise InvalidInputError(f"several model families can serve {purpose} ({', '.join(sorted(f.label for f in able))});"
                            f" choose one with --family NAME (Python: family=NAME)")
