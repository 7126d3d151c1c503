"""Relationships between the application's SQLAlchemy models and the five.

SQLAlchemy resolves ``relationship("WorkflowRun")`` through its declarative registry, which
holds mapped classes only, and the five model classes are this package's own (their rows
are read and written in Rust). So the registry of ``Base`` holds a stand-in for each: a
class named as the model and mapped onto the same ``Table``. The application's
relationships configure as on SQLAlchemy models (join conditions, ``back_populates``,
``backref``, ``foreign_keys``, ``.join(Step.run)``, loader options), and once the mappers
are configured, every attribute that would hand out a stand-in is replaced by one handing
out this package's objects, and every ``back_populates`` / ``backref`` name given for the
five appears on the model class:

- ``step.run`` is the ``WorkflowRun`` the step's foreign key names, from the session (its
  identity map, else the database); ``run.project`` is the application's ``Project``
  ``project_id`` names. Assigning one sets the foreign key, adds the other object to the
  session if it is in none, and, if the parent has no id yet (SQLAlchemy fills defaults at
  insert), sets the key at the next flush, after the parent's row is written.
- ``run.workflow_steps`` (``project.workflow_runs``) lists the rows naming the object: the
  database's (read without autoflush) and the session's pending objects naming it, less
  those marked for deletion. Each access reads afresh; ``append`` / ``extend`` /
  ``remove`` on the list set or clear the child's key.

Relationships of the application's models among themselves are SQLAlchemy's, untouched.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from sqlalchemy import event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Mapper, RelationshipProperty, object_session, relationship
from sqlalchemy.orm.exc import DetachedInstanceError
from sqlalchemy.orm.interfaces import MANYTOONE

from cmbagent_db import _native, models

#: Where an object keeps the parent assigned through a relationship attribute:
#: ``__dict__[_CACHE + key] = (key values, parent)``.
_CACHE = "_cmbagent_db_parent_"
#: Links an object not yet in a session keeps until it is added to one (``Session.add``
#: defers them): ``__dict__[PENDING] = [(child attrs, parent, parent attrs), ...]``.
PENDING = "_cmbagent_db_links"
#: The bridge session an ORM session belongs to: ``orm_session.info[BRIDGE]``, a weakref.
BRIDGE = "cmbagent_db.session"
_MODELS = (models.Session, models.WorkflowRun, models.SessionState, models.ApprovalRequest,
           models.ActiveConnection)


def bridge_of(obj: Any, side: Optional["_Side"] = None) -> Any:
    """The bridge session holding ``obj`` (of either kind), or None. Reading ``side`` of an
    object in a session of this package alone is an error: it has no SQLAlchemy."""
    if isinstance(obj, models.Model):
        db = _native.object_session(obj)
        ref = None if db is None else db._bridge
        bridge = None if ref is None else ref()
        if db is not None and bridge is None and side is not None:
            from cmbagent_db.exceptions import InvalidRequestError

            raise InvalidRequestError(
                f"{side.describe()} reads {side.target.__name__} rows through SQLAlchemy, and "
                f"this {type(obj).__name__} is in a session of cmbagent_db alone: use a "
                "cmbagent_db.sqlalchemy session (its get_db_session() or a sessionmaker)")
        return bridge
    orm_session = object_session(obj)
    ref = None if orm_session is None else orm_session.info.get(BRIDGE)
    return None if ref is None else ref()


def copy_key(child: Any, child_attrs: List[str], parent: Any, parent_attrs: List[str]) -> bool:
    """Sets ``child``'s key to ``parent``'s; False (nothing set) while ``parent`` has no id."""
    values = [getattr(parent, a) for a in parent_attrs]
    if None in values:
        return False
    for a, v in zip(child_attrs, values):
        setattr(child, a, v)
    return True


class _Side:
    """One relationship as this package hands it out: from ``owner`` objects to ``target``
    ones along ``pairs`` of (owner attribute, target attribute)."""

    def __init__(self, key: str, owner: type, target: type, pairs: List[Tuple[str, str]],
                 original: Any = None) -> None:
        self.key = key
        self.owner = owner
        self.target = target
        self.pairs = pairs
        #: SQLAlchemy's attribute this one replaces, which class access still gives (for
        #: joins and loader options); None on the five.
        self.original = original

    def on_class(self) -> Any:
        return self if self.original is None else self.original

    def describe(self) -> str:
        return f"{self.owner.__name__}.{self.key}"

    def check(self, value: Any) -> None:
        if not isinstance(value, self.target):
            raise TypeError(f"{self.describe()} takes {self.target.__name__} objects, got "
                            f"{type(value).__name__} {value!r}")

    def link(self, child: Any, parent: Any, child_attrs: List[str],
             parent_attrs: List[str]) -> None:
        """Points ``child``'s key at ``parent`` now, or at the next flush if ``parent`` has
        no id yet; puts the one in the other's session."""
        keyed = copy_key(child, child_attrs, parent, parent_attrs)
        bridge = bridge_of(child) or bridge_of(parent)
        if bridge is None:
            if not keyed:
                child.__dict__.setdefault(PENDING, []).append(
                    (child_attrs, parent, parent_attrs))
            return
        if not keyed:
            bridge.defer_link(child, child_attrs, parent, parent_attrs)
        for obj in (child, parent):
            if obj not in bridge:
                bridge.add(obj)


class _Parent(_Side):
    """``step.run``: the object the owner's foreign key names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fk = [a for a, _ in self.pairs]
        self.pk = [b for _, b in self.pairs]

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self.on_class()
        values = tuple(getattr(instance, a) for a in self.fk)
        cached = instance.__dict__.get(_CACHE + self.key)
        if cached is not None and (cached[0] == values or None in values):
            return cached[1]
        if None in values:
            return None
        bridge = bridge_of(instance, self)
        if bridge is None:
            raise DetachedInstanceError(
                f"{self.describe()} is not loaded and {type(instance).__name__} is in no "
                "open session: read it while the session is open")
        parent = bridge.get(self.target, values[0] if len(values) == 1 else values)
        instance.__dict__[_CACHE + self.key] = (values, parent)
        return parent

    def __set__(self, instance: Any, value: Any) -> None:
        if value is None:
            for a in self.fk:
                setattr(instance, a, None)
            instance.__dict__.pop(_CACHE + self.key, None)
            return
        self.check(value)
        self.link(instance, value, self.fk, self.pk)
        instance.__dict__[_CACHE + self.key] = (
            tuple(getattr(value, b) for b in self.pk), value)


class _Children(_Side):
    """``run.workflow_steps``: the objects whose foreign key names the owner."""

    def __init__(self, *args: Any, backref: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pk = [a for a, _ in self.pairs]
        self.fk = [b for _, b in self.pairs]
        #: The parent attribute on the child's side (``step.run``), if there is one.
        self.backref = backref

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self.on_class()
        return Collection(self, instance, self.load(instance))

    def __set__(self, instance: Any, value: Any) -> None:
        Collection(self, instance, self.load(instance)).replace(list(value))

    def names(self, child: Any, parent: Any) -> bool:
        cached = child.__dict__.get(_CACHE + self.backref) if self.backref else None
        if cached is not None and cached[1] is parent:
            return True
        values = [getattr(parent, a) for a in self.pk]
        return None not in values and [getattr(child, b) for b in self.fk] == values

    def load(self, instance: Any) -> List[Any]:
        bridge = bridge_of(instance, self)
        if bridge is None:
            return []
        values = [getattr(instance, a) for a in self.pk]
        rows: List[Any] = []
        if None not in values:
            rows = bridge.children(self.target, dict(zip(self.fk, values)))
        deleted = bridge.deleted
        pending = [o for o in bridge.new
                   if isinstance(o, self.target) and o not in rows and self.names(o, instance)]
        return [o for o in rows + pending if not any(o is d for d in deleted)]


class Collection(list):
    """A relationship's objects as read; ``append`` / ``extend`` / ``remove`` set or clear
    each child's foreign key (written at the next flush)."""

    def __init__(self, side: _Children, owner: Any, items: List[Any]) -> None:
        super().__init__(items)
        self._side = side
        self._owner = owner

    def append(self, child: Any) -> None:
        self._side.check(child)
        back = self._side.backref
        if back is not None:
            setattr(child, back, self._owner)
        else:
            self._side.link(child, self._owner, self._side.fk, self._side.pk)
        if child not in self:
            super().append(child)

    def extend(self, children: Any) -> None:
        for child in children:
            self.append(child)

    def remove(self, child: Any) -> None:
        super().remove(child)
        for b in self._side.fk:
            setattr(child, b, None)
        back = self._side.backref
        if back is not None:
            child.__dict__.pop(_CACHE + back, None)

    def replace(self, children: List[Any]) -> None:
        for child in list(self):
            if not any(child is c for c in children):
                self.remove(child)
        self.extend(children)


def _set_added_attributes(self: Any, **kwargs: Any) -> None:
    """``__init__`` of a model class given relationship attributes here: the constructor
    (``WorkflowRun(project=p)``) sets the columns and leaves these names to it."""
    cls = type(self)
    for key, value in kwargs.items():
        if isinstance(getattr(cls, key, None), _Side):
            setattr(self, key, value)


# ---------------------------------------------------------------------- configuration


def _stand_ins(base: Any) -> Dict[type, type]:
    """Maps each model class to a stand-in class mapped onto its table in ``base``'s
    registry (so ``relationship("WorkflowRun")`` resolves)."""
    out: Dict[type, type] = {}
    for model in _MODELS:
        stand_in = type(model.__name__, (), {
            "__module__": __name__,
            "__doc__": f"SQLAlchemy's mapping of the {model.__tablename__} table, for "
                       f"relationships to {model.__name__} (whose objects are "
                       "cmbagent_db.models'); not for use of its own.",
        })
        base.registry.map_imperatively(stand_in, base.metadata.tables[model.__tablename__])
        out[model] = stand_in
    return out


class Wiring:
    """Hooks ``base``'s mapper configuration: before it, relationships naming the model
    classes themselves are pointed at their stand-ins and each ``back_populates`` name for
    the five is declared on the stand-in; after it, the attributes are replaced."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.stand_ins = _stand_ins(base)
        self.model_of = {s: m for m, s in self.stand_ins.items()}
        self.by_name = {m.__name__: s for m, s in self.stand_ins.items()}
        event.listen(Mapper, "before_configured", self.before)
        event.listen(Mapper, "after_configured", self.after)

    def _ours(self) -> List[Mapper]:
        return [m for m in self.base.registry.mappers if m.class_ not in self.model_of]

    def _stand_in_for(self, argument: Any) -> Optional[type]:
        if isinstance(argument, str):
            return self.by_name.get(argument)
        if argument in self.stand_ins:
            return self.stand_ins[argument]
        if callable(argument) and not isinstance(argument, type):
            try:
                resolved = argument()
            except NameError:
                return None
            return self.stand_ins.get(resolved)
        return None

    def before(self) -> None:
        for mapper in self._ours():
            for prop in list(mapper._props.values()):
                if not isinstance(prop, RelationshipProperty):
                    continue
                stand_in = self._stand_in_for(prop.argument)
                if stand_in is None:
                    continue
                prop.argument = stand_in
                back = prop.back_populates
                target: Mapper[Any] = sa_inspect(stand_in)
                if back and back not in target._props:
                    if hasattr(self.model_of[stand_in], back):
                        raise AttributeError(
                            f"{mapper.class_.__name__}.{prop.key} back_populates "
                            f"{back!r}, which {self.model_of[stand_in].__name__} has "
                            "already: choose another name")
                    init = prop._init_args
                    target.add_property(back, relationship(
                        mapper.class_, back_populates=prop.key,
                        foreign_keys=init.foreign_keys.argument,
                        primaryjoin=init.primaryjoin.argument,
                        viewonly=prop.viewonly))

    def after(self) -> None:
        for stand_in, model in self.model_of.items():
            stand_in_mapper: Mapper[Any] = sa_inspect(stand_in)
            for prop in stand_in_mapper.relationships:
                if prop.mapper.class_ in self.model_of:
                    continue  # the five among themselves are this package's own
                self._install(model, prop, prop.mapper.class_, original=None)
        for mapper in self._ours():
            for prop in mapper.relationships:
                target = self.model_of.get(prop.mapper.class_)
                if target is not None:
                    self._install(mapper.class_, prop, target,
                                  original=mapper.class_manager.get(prop.key))

    def _install(self, owner: type, prop: RelationshipProperty, target: type,
                 original: Any) -> None:
        current = owner.__dict__.get(prop.key)
        if isinstance(current, _Side):
            return
        local = prop.parent
        remote = prop.mapper
        pairs = [(self._attr(local, lc), self._attr(remote, rc))
                 for lc, rc in prop.local_remote_pairs]
        side: _Side
        if prop.direction is MANYTOONE:
            side = _Parent(prop.key, owner, target, pairs, original=original)
        else:
            back = prop.back_populates or prop.backref
            if isinstance(back, tuple):  # backref=("name", {...options})
                back = back[0]
            side = _Children(prop.key, owner, target, pairs, original=original, backref=back)
        if original is None and "__init__" not in owner.__dict__:
            owner.__init__ = _set_added_attributes  # type: ignore[misc]
        setattr(owner, prop.key, side)

    def _attr(self, mapper: Mapper, column: Any) -> str:
        """The attribute of ``column`` on the objects handed out: the column's own name on
        the five, the mapped property's key on the application's models."""
        if mapper.class_ in self.model_of:
            return column.key
        return mapper.get_property_by_column(column).key
