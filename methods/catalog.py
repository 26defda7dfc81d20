"""The method catalogue: every method kvbench can run, read from ``conf/method/*.yaml``.

One YAML per method: ``_target_`` names its class (``methods.<module>.<Class>``), the other keys are
its knobs with their defaults. The catalogue is the only way the runner builds a method:

- only a class some YAML names is ever instantiated (no Hydra ``instantiate`` of a ``_target_``
  given on the command line, nothing nested: a knob value holding ``_target_``, ``_args_`` ... is
  refused), so an override cannot run arbitrary code;
- a knob the class does not declare (a dataclass field) is refused with the list of its knobs;
- a row's ``method`` is the catalogue name of the class that ran.

Reading the catalogue imports nothing (the YAMLs are plain data); :meth:`Entry.cls` imports the
method's module when it is first needed.

    from methods import catalog
    catalog.names()                                  # ['adakv', 'fp8', 'full', ...]
    catalog.get("snapkv").family                     # 'eviction'
    method = catalog.build("snapkv", ratio=0.5, window=16)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "method"
# Hydra's instantiation keys: never accepted in a method's knobs, at any depth.
RESERVED = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")
PACKAGE = "methods."


class CatalogError(ValueError):
    """A method name, class or knob the catalogue does not know (bad input: the message says what to do)."""


@dataclass(frozen=True)
class Entry:
    """One ``conf/method/<name>.yaml``: the method's name, its class path and its default knobs."""

    name: str
    target: str  # "methods.eviction.SnapKV"
    defaults: dict[str, Any] = field(default_factory=dict)

    def cls(self) -> type:
        """The method's class (imports its module)."""
        mod, _, attr = self.target.rpartition(".")
        klass = getattr(importlib.import_module(mod), attr, None)
        if not isinstance(klass, type):
            raise CatalogError(f"conf/method/{self.name}.yaml: _target_ {self.target!r} is not a class")
        return klass

    @property
    def family(self) -> str:
        return str(self.cls().family)

    def knobs(self) -> tuple[str, ...]:
        """The knobs the class declares: its dataclass fields but ``ratio``."""
        klass = self.cls()
        if not dataclasses.is_dataclass(klass):
            return tuple(k for k in self.defaults)
        return tuple(f.name for f in dataclasses.fields(klass) if f.name != "ratio" and f.init)

    def build(self, *, ratio: float, **knobs: Any) -> Any:
        """An instance at ``ratio`` with the YAML's defaults updated by ``knobs``.

        Raises CatalogError for a knob the class does not declare or a reserved key; the class's own
        ``__post_init__`` raises ValueError for a knob value it refuses."""
        values = {**self.defaults, **knobs}
        _refuse_reserved(values, f"method {self.name}")
        declared = self.knobs()
        unknown = [k for k in values if k not in declared]
        if unknown:
            hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, declared, n=1)) else k
                     for k in unknown]
            raise CatalogError(f"method {self.name} has no knob {', '.join(hints)}; its knobs: "
                               f"{', '.join(declared) or '(none)'}")
        return self.cls()(ratio=float(ratio), **values)


def _refuse_reserved(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if k in RESERVED:
                raise CatalogError(f"{where}: {k!r} is not accepted in a method's knobs (methods are built only "
                                   f"from the catalogue, conf/method/*.yaml; choose one with method=<name>)")
            _refuse_reserved(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for v in value:
            _refuse_reserved(v, where)


@functools.lru_cache(maxsize=4)
def _load(conf_dir: str) -> dict[str, Entry]:
    import yaml

    out: dict[str, Entry] = {}
    for path in sorted(Path(conf_dir).glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        target = cfg.pop("_target_", None)
        if not isinstance(target, str) or not target.startswith(PACKAGE) or target.count(".") < 2:
            raise CatalogError(f"{path}: _target_ must name a class in the methods package "
                               f"(methods.<module>.<Class>), got {target!r}")
        _refuse_reserved(cfg, str(path))
        out[path.stem] = Entry(name=path.stem, target=target, defaults=cfg)
    return out


def entries(conf_dir: str | Path = CONF_DIR) -> dict[str, Entry]:
    """name -> Entry for every YAML under ``conf_dir`` (cached per process)."""
    return dict(_load(str(conf_dir)))


def names(conf_dir: str | Path = CONF_DIR) -> list[str]:
    return sorted(entries(conf_dir))


def get(name: str, conf_dir: str | Path = CONF_DIR) -> Entry:
    """The entry named ``name``; an unknown name says what is close and what exists."""
    table = entries(conf_dir)
    if name not in table:
        close = difflib.get_close_matches(str(name), list(table), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise CatalogError(f"unknown method {name!r}; {hint}available: {', '.join(sorted(table))}")
    return table[name]


def by_target(target: str, conf_dir: str | Path = CONF_DIR) -> list[Entry]:
    """Every entry whose class is ``target`` (several YAMLs may share a class with other knobs)."""
    return [e for e in entries(conf_dir).values() if e.target == target]


def family(name: str, conf_dir: str | Path = CONF_DIR) -> str:
    return get(name, conf_dir).family


def build(name: str, *, ratio: float, conf_dir: str | Path = CONF_DIR, **knobs: Any) -> Any:
    """The method ``name`` at ``ratio`` with its YAML defaults updated by ``knobs``."""
    return get(name, conf_dir).build(ratio=ratio, **knobs)
