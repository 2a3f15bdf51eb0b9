"""One Triton model repository for several engine directories (model families).

A single unnamed family is written exactly as `write_repository` always has (plain model names);
named families are written side by side, each model as ``<family>.<model>`` (see `ti2i.families`), with a
`families` model that lists them to clients without the server's key (`directory.py`).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from ti2i.budget import machine_budget
from ti2i.errors import InvalidInputError
from ti2i.manifest import Manifest
from ti2i.triton_models.core import CoreOptions
from ti2i.families import split_served_name
from ti2i.triton_models.directory import DIRECTORY_MODEL, directory_config
from ti2i.triton_models.repository import RepositoryOptions, _check_replaceable, _write_model, write_repository

DIRECTORY_FILE = Path(__file__).with_name("directory_model.py")


def write_family_repository(manifests: Mapping[str | None, Manifest], out_dir: str | Path,
                            options: RepositoryOptions = RepositoryOptions(),
                            models: Mapping[str | None, Sequence[str] | None] | None = None,
                            methods: Mapping[str | None, Sequence[str]] | None = None,
                            core_options: CoreOptions | None = CoreOptions()) -> Path:
    """Write (replacing) one repository serving every family; `models` limits a family to some components;
    `methods` names the method models each family serves and `core_options` (`core.CoreOptions`) its engine
    core (as `write_repository` takes them)."""
    if not manifests:
        raise InvalidInputError("no engine directory to serve")
    models = models or {}
    methods = methods or {}
    if None in manifests:
        if len(manifests) > 1:
            raise InvalidInputError("an unnamed family cannot be served beside others: name every family")
        return write_repository(manifests[None], out_dir, options, models=models.get(None),
                                methods=methods.get(None, ()), core_options=core_options)
    out = Path(out_dir).resolve()
    for manifest in manifests.values():
        if manifest.root == out or manifest.root.is_relative_to(out):
            raise InvalidInputError(f"the repository {out} would replace the engine directory {manifest.root}; "
                                    f"write it elsewhere (e.g. {manifest.root.parent / 'model_repository'})")
    if out.exists():
        _check_replaceable(out)
        shutil.rmtree(out)
    # One machine, one memory budget: each family's engine-backed models get their share of it, as one
    # family's components share its budget (`instance_budget`).
    engines = {family: sum(manifest.components[n].file is not None
                           for n in (models.get(family) or manifest.components))
               for family, manifest in manifests.items()}
    total = options.memory_budget if options.memory_budget is not None else machine_budget()
    for family, manifest in manifests.items():
        share = total * max(1, engines[family]) // max(1, sum(engines.values()))
        write_repository(manifest, out, dataclasses.replace(options, memory_budget=share),
                         models=models.get(family), family=family, replace=False, methods=methods.get(family, ()),
                         core_options=core_options)
    served = {family: [p.name for p in out.iterdir() if split_served_name(p.name)[0] == family]
              for family in manifests}
    _write_model(out / DIRECTORY_MODEL, directory_config(served), DIRECTORY_FILE)
    return out

