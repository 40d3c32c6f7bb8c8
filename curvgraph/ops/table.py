"""Tables from op keys to what serves them: the rule table and the decomposition table.

Both refuse a second registration for a key unless ``override=True``, so two modules (or
a user and a built-in) cannot silently replace each other's entries. A table may also
answer keys it holds no entry for with a *default* (:meth:`OpTable.add_default`): the rules
layer refuses custom ``torch.autograd.Function`` calls that way, with the reason.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Set

from curvgraph.ops.keys import OpKey, aliases_of, canonical_key, check_op_key, op_name

__all__ = ["OpTable", "RULES", "DECOMPOSITIONS"]


class OpTable:
    """A map from canonical op keys to entries (rules, decompositions).

    Args:
        what: what an entry is, for messages (``"rule"``).
        expand_aliases: register every spelling of each key's alias group.
    """

    def __init__(self, what: str, expand_aliases: bool = True):
        self.what = what
        self.expand_aliases = expand_aliases
        self._entries: Dict[Any, Any] = {}
        self._defaults: List[Callable[[Any], Optional[Any]]] = []

    def keys_of(self, op_keys: Iterable[OpKey]) -> Set[Any]:
        """The canonical keys ``op_keys`` stand for (with their aliases if the table expands)."""
        if self.expand_aliases:
            return set().union(*(aliases_of(k) for k in op_keys))
        return {canonical_key(k) for k in op_keys}

    def register(self, op_keys: Iterable[OpKey], entry: Any, override: bool = False) -> None:
        """Map every key of ``op_keys`` to ``entry``.

        Raises:
            TypeError: a key is not an op key (:func:`~curvgraph.ops.keys.check_op_key`).
            ValueError: a key already has another entry and ``override`` is false.
        """
        op_keys = list(op_keys)
        for key in op_keys:
            check_op_key(key, f"the key of a {self.what}")
        keys = self.keys_of(op_keys)
        taken = sorted(
            op_name(k) for k in keys if k in self._entries and self._entries[k] is not entry
        )
        if taken and not override:
            raise ValueError(
                f"ops already have a {self.what}: {', '.join(taken)}; pass override=True to replace"
            )
        for k in keys:
            self._entries[k] = entry

    def add_default(self, default: Callable[[Any], Optional[Any]]) -> None:
        """Answer keys without an entry with ``default(canonical key)`` (``None``: no entry).

        Defaults are not registered entries: :meth:`by_entry` does not list them and a
        registration for the key replaces them without ``override``.
        """
        if default not in self._defaults:
            self._defaults.append(default)

    def lookup(self, key: OpKey, defaults: bool = True) -> Optional[Any]:
        """The entry of ``key`` (or, with ``defaults``, the first default's), or ``None``."""
        key = canonical_key(key)
        entry = self._entries.get(key)
        if entry is None and defaults:
            entry = next((e for e in (d(key) for d in self._defaults) if e is not None), None)
        return entry

    def remove(self, op_keys: Iterable[OpKey]) -> None:
        """Remove the entries of ``op_keys`` (and their aliases if the table expands)."""
        for key in self.keys_of(op_keys):
            self._entries.pop(key, None)

    def by_entry(self) -> Dict[Any, Set[Any]]:
        """Every entry with the set of keys it serves."""
        result: Dict[Any, Set[Any]] = {}
        for key, entry in self._entries.items():
            result.setdefault(entry, set()).add(key)
        return result


#: op key -> :class:`curvgraph.rules.Rule` (filled by ``curvgraph.rules.register_rule``)
RULES = OpTable("rule")
#: op key -> decomposition function (filled by :func:`register_decomposition`)
DECOMPOSITIONS = OpTable("decomposition", expand_aliases=False)
