"""Explicit name -> object registries with helpful errors.

Every pluggable choice in a config (model, loss, optimizer, schedule, dataset, sharding preset, evaluator)
is a name looked up in a `Registry`. Registries are filled by ordinary imports of the modules that define
the objects; they refuse duplicates and answer an unknown name with a did-you-mean suggestion plus the full
list of names, so a typo in a config fails before anything heavy runs.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, TypeVar

T = TypeVar("T")


class Registry:
  """A named table of objects of one kind (e.g. "model").

  Usage:
    MODELS = Registry("model")

    @MODELS.register("unet")
    class UNet(nn.Module): ...

    MODELS.get("unet")  # -> UNet
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: Dict[str, Any] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator registering `obj` under `name`; a second object under the same name is an error."""

    def decorator(obj: T) -> T:
      self.add(name, obj)
      return obj

    return decorator

  def add(self, name: str, obj: Any) -> None:
    if not isinstance(name, str) or not name:
      raise ValueError(f"{self.kind} registry: names must be non-empty strings, got {name!r}.")
    if name in self._entries:
      raise ValueError(f"{self.kind} {name!r} is registered twice "
                       f"({self._entries[name]!r} and {obj!r}); names must be unique.")
    self._entries[name] = obj

  def get(self, name: str) -> Any:
    """Returns the object registered as `name`, or raises KeyError with suggestions."""
    try:
      return self._entries[name]
    except (KeyError, TypeError):
      raise KeyError(self.unknown_message(name)) from None

  def unknown_message(self, name: Any) -> str:
    names = self.names()
    close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"Unknown {self.kind} {name!r}.{hint} Known {self.kind} names: {', '.join(names)}."

  def accepted_kwargs(self, name: str) -> Optional[List[str]]:
    """Keyword names the object registered as `name` accepts; None if it takes **kwargs."""
    obj = self.get(name)
    try:
      signature = inspect.signature(obj)
    except (TypeError, ValueError):
      return None
    accepted = []
    for param in signature.parameters.values():
      if param.kind is inspect.Parameter.VAR_KEYWORD:
        return None
      if param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
        accepted.append(param.name)
    # Flax modules are dataclasses whose constructors also take the bookkeeping fields parent/name.
    return [a for a in accepted if a not in ("parent", "name", "self")]

  def check_kwargs(self, name: str, kwargs: Iterable[str], where: str = "") -> None:
    """Raises ValueError if `kwargs` holds a key that the object registered as `name` does not accept."""
    accepted = self.accepted_kwargs(name)
    if accepted is None:
      return
    for key in kwargs:
      if key not in accepted:
        close = difflib.get_close_matches(key, accepted, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        place = f"{where}: " if where else ""
        raise ValueError(f"{place}unknown key {key!r} for {self.kind} {name!r}.{hint} "
                         f"Accepted keys: {', '.join(sorted(accepted))}.")

  def build(self, name: str, kwargs: Optional[Mapping[str, Any]] = None, where: str = "") -> Any:
    """Calls the object registered as `name` with keyword arguments `kwargs` (a config sub-dict).

    Keys are checked against its signature before the call, so a TypeError raised inside the object is
    never mistaken for a config mistake. Raises KeyError for an unknown name, ValueError naming `where`,
    the key and the accepted keys for an unknown or missing argument.
    """
    obj = self.get(name)
    kwargs = dict(kwargs or {})
    self.check_kwargs(name, kwargs, where)
    try:
      inspect.signature(obj).bind(**kwargs)
    except TypeError as e:  # a required argument is missing
      place = f"{where}: " if where else ""
      raise ValueError(f"{place}cannot build {self.kind} {name!r} from keys {sorted(kwargs)}: {e}. "
                       f"Accepted keys: {', '.join(sorted(self.accepted_kwargs(name) or []))}.") from None
    except ValueError:  # no signature available: let the call itself report
      pass
    return obj(**kwargs)

  def names(self) -> List[str]:
    return sorted(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._entries)

  def __repr__(self) -> str:
    return f"Registry({self.kind!r}, {self.names()})"


def merge_options(given: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> Dict[str, Any]:
  """`given` merged over `defaults`, for an options dict of a config (`config.input`, `config.privacy`, ...).

  Raises ValueError "<where>: unknown key 'x'. Did you mean 'y'? Known keys: ..." for a key `defaults` lacks.
  """
  options = dict(defaults)
  for key, value in dict(given).items():
    if key not in defaults:
      close = difflib.get_close_matches(str(key), list(defaults), n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"{where}: unknown key {key!r}.{hint} Known keys: {', '.join(defaults)}.")
    options[key] = value
  return options
