//! Relationship attributes: `approval.run` (the parent row a foreign key names) and
//! `run.approval_requests` (the rows naming it), loaded through the object's session on
//! first access and kept in step on both sides in memory. Assigning sets or clears the
//! foreign key at once; the next flush writes it.

use pyo3::exceptions::{PyIndexError, PyTypeError, PyValueError};
use pyo3::gc::{PyTraverseError, PyVisit};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString};

use crate::error::ErrorKind;
use crate::python::errors::raise;
use crate::python::model::{PyModel, Slot};
use crate::python::session::{exclusive, PyDbSession};
use crate::schema::{RelKind, Relationship, TableId, TABLES};
use crate::unit_of_work::ObjState;
use crate::value::Value;

/// What an object caches for one side of a foreign key: the same key on the parent (its
/// collection) and on the child (its parent), told apart by the kind.
pub type RelKey = (RelKind, TableId, usize);

pub fn key_of(r: &Relationship) -> RelKey {
    (r.kind, r.child, r.column_index())
}

/// A relationship attribute on a model class: `ApprovalRequest.run`.
#[pyclass(module = "cmbagent_db", name = "Relationship", frozen)]
pub struct PyRelationship {
    pub table: TableId,
    pub index: usize,
}

impl PyRelationship {
    pub fn rel(&self) -> &'static Relationship {
        &TABLES[self.table].relationships[self.index]
    }
}

/// A loaded one-to-many collection: a list of objects that sets or clears each child's
/// foreign key as it is changed.
#[pyclass(module = "cmbagent_db", name = "RelationshipList")]
pub struct PyRelationshipList {
    owner: Py<PyAny>,
    table: TableId,
    index: usize,
    items: Vec<Py<PyAny>>,
}

fn describe(r: &Relationship, owner: TableId) -> String {
    format!("{}.{}", TABLES[owner].model, r.name)
}

/// The model object behind `obj`, which must be of `table`.
fn model_of<'py>(
    obj: &Bound<'py, PyAny>,
    table: TableId,
    what: &str,
) -> PyResult<Bound<'py, PyModel>> {
    match obj.cast::<PyModel>() {
        Ok(m) if m.borrow().table == table => Ok(m.clone()),
        _ => Err(PyTypeError::new_err(format!(
            "{what} takes {} objects, got {} {}",
            TABLES[table].model,
            obj.get_type().name()?,
            obj.repr()?
        ))),
    }
}

fn pk_of(py: Python<'_>, obj: &Bound<'_, PyModel>) -> PyResult<String> {
    let m = obj.borrow();
    m.pk(py).ok_or_else(|| {
        PyValueError::new_err(format!(
            "{} has no id, so nothing can reference it",
            TABLES[m.table].model
        ))
    })
}

/// Two objects that would reference each other must not belong to two open sessions.
fn same_session(py: Python<'_>, a: &Bound<'_, PyModel>, b: &Bound<'_, PyModel>) -> PyResult<()> {
    if let (Some(x), Some(y)) = (a.borrow().session(py), b.borrow().session(py)) {
        if !x.is(&y) {
            return Err(raise(
                ErrorKind::InvalidRequest,
                format!(
                    "{} belongs to another session than {}; expunge it from that one or merge it first",
                    TABLES[b.borrow().table].model,
                    TABLES[a.borrow().table].model
                ),
            ));
        }
    }
    Ok(())
}

/// `session.add(obj)` for an object a tracked object now refers to (SQLAlchemy's
/// save-update cascade), when it is not tracked yet.
fn cascade_add(
    py: Python<'_>,
    tracked: &Bound<'_, PyModel>,
    obj: &Bound<'_, PyModel>,
) -> PyResult<()> {
    if obj.borrow().state != ObjState::Transient {
        return Ok(());
    }
    let Some(session) = tracked.borrow().session(py) else {
        return Ok(());
    };
    exclusive(&session)?.add_object(obj.as_any())
}

fn set_fk(m: &mut PyModel, column: usize, value: Value) {
    m.values[column] = Slot::Raw(value);
    m.dirty |= 1 << column;
}

/// The loaded collection `key` of `parent`, if it was loaded.
fn loaded_collection<'py>(
    py: Python<'py>,
    parent: &Bound<'py, PyModel>,
    key: RelKey,
) -> Option<Bound<'py, PyRelationshipList>> {
    let m = parent.borrow();
    let c = m.cached(key)?;
    c.bind(py).cast::<PyRelationshipList>().ok().cloned()
}

/// Points `child`'s foreign key at `parent` (or at nothing), keeping the parents' loaded
/// collections in step: it leaves the old parent's and, with `join`, joins the new one's
/// (a caller changing that collection itself passes `false`: it is borrowed already).
fn repoint(
    py: Python<'_>,
    child: &Bound<'_, PyModel>,
    key: RelKey,
    parent: Option<&Bound<'_, PyModel>>,
    join: bool,
) -> PyResult<()> {
    let reverse = (RelKind::ToChildren, key.1, key.2);
    let old = child
        .borrow()
        .cached((RelKind::ToParent, key.1, key.2))
        .map(|o| o.clone_ref(py));
    if let Some(old) = old {
        let old = old.bind(py).cast::<PyModel>()?.clone();
        if parent.is_none_or(|p| !p.is(&old)) {
            if let Some(list) = loaded_collection(py, &old, reverse) {
                list.borrow_mut().items.retain(|o| !o.is(child));
            }
        }
    }
    let fk = match parent {
        Some(p) => Value::Text(pk_of(py, p)?),
        None => Value::Null,
    };
    {
        let mut m = child.borrow_mut();
        set_fk(&mut m, key.2, fk);
        m.set_cached(
            (RelKind::ToParent, key.1, key.2),
            parent.map(|p| p.clone().into_any().unbind()),
        );
    }
    if let Some(p) = parent.filter(|_| join) {
        if let Some(list) = loaded_collection(py, p, reverse) {
            let mut l = list.borrow_mut();
            if !l.items.iter().any(|o| o.is(child)) {
                l.items.push(child.clone().into_any().unbind());
            }
        }
    }
    Ok(())
}

impl PyRelationshipList {
    fn rel(&self) -> &'static Relationship {
        &TABLES[self.table].relationships[self.index]
    }

    /// Checks `child` and makes it one of the owner's: its key set, its parent cached.
    fn link<'py>(
        &self,
        py: Python<'py>,
        child: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyModel>> {
        let r = self.rel();
        let owner = self.owner.bind(py).cast::<PyModel>()?.clone();
        let child = model_of(child, r.child, &describe(r, self.table))?;
        same_session(py, &owner, &child)?;
        Ok(child)
    }

    fn attach(&mut self, py: Python<'_>, child: &Bound<'_, PyModel>) -> PyResult<()> {
        let r = self.rel();
        let owner = self.owner.bind(py).cast::<PyModel>()?.clone();
        repoint(
            py,
            child,
            (RelKind::ToParent, r.child, r.column_index()),
            Some(&owner),
            false,
        )?;
        self.items.retain(|o| !o.is(child));
        self.items.push(child.clone().into_any().unbind());
        cascade_add(py, &owner, child)
    }

    /// Clears a removed child's key; with delete-orphan the child is deleted (or, not yet
    /// inserted, dropped from the session).
    fn detach(&self, py: Python<'_>, child: &Bound<'_, PyModel>) -> PyResult<()> {
        let r = self.rel();
        let column = r.column_index();
        let owner = self.owner.bind(py).cast::<PyModel>()?.clone();
        let owner_pk = owner.borrow().pk(py);
        {
            let mut m = child.borrow_mut();
            if m.pk(py).is_some() && m.text(py, column) == owner_pk {
                set_fk(&mut m, column, Value::Null);
                m.set_cached((RelKind::ToParent, r.child, column), None);
            }
        }
        if !r.delete_orphan {
            return Ok(());
        }
        let (state, session) = {
            let m = child.borrow();
            (m.state, m.session(py))
        };
        if let Some(session) = session {
            match state {
                ObjState::Persistent => exclusive(&session)?.delete_object(child.as_any())?,
                ObjState::Pending => exclusive(&session)?.expunge_object(child.as_any())?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Replaces the items with `new` (an assignment to the attribute).
    fn replace(&mut self, py: Python<'_>, new: &Bound<'_, PyAny>) -> PyResult<()> {
        if new.is_instance_of::<PyString>() {
            return Err(PyTypeError::new_err(format!(
                "{} takes a list of objects, not a str",
                describe(self.rel(), self.table)
            )));
        }
        let mut children = Vec::new();
        for item in new.try_iter()? {
            children.push(self.link(py, &item?)?);
        }
        let removed: Vec<Py<PyAny>> = self
            .items
            .iter()
            .filter(|o| !children.iter().any(|c| c.is(o.bind(py))))
            .map(|o| o.clone_ref(py))
            .collect();
        for old in removed {
            self.items.retain(|o| !o.is(&old));
            self.detach(py, old.bind(py).cast::<PyModel>()?)?;
        }
        for child in &children {
            self.attach(py, child)?;
        }
        Ok(())
    }
}

#[pymethods]
impl PyRelationshipList {
    fn append(&mut self, py: Python<'_>, child: &Bound<'_, PyAny>) -> PyResult<()> {
        let child = self.link(py, child)?;
        self.attach(py, &child)
    }

    fn extend(&mut self, py: Python<'_>, children: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut checked = Vec::new();
        for c in children.try_iter()? {
            checked.push(self.link(py, &c?)?);
        }
        for child in &checked {
            self.attach(py, child)?;
        }
        Ok(())
    }

    fn remove(&mut self, py: Python<'_>, child: &Bound<'_, PyAny>) -> PyResult<()> {
        let Some(pos) = self.items.iter().position(|o| o.is(child)) else {
            return Err(PyValueError::new_err(format!(
                "{} does not hold {}",
                describe(self.rel(), self.table),
                child.repr()?
            )));
        };
        let removed = self.items.remove(pos);
        self.detach(py, removed.bind(py).cast::<PyModel>()?)
    }

    #[pyo3(signature = (index = -1))]
    fn pop(&mut self, py: Python<'_>, index: isize) -> PyResult<Py<PyAny>> {
        let n = self.items.len() as isize;
        let i = if index < 0 { index + n } else { index };
        if !(0..n).contains(&i) {
            return Err(PyIndexError::new_err("pop index out of range"));
        }
        let removed = self.items.remove(i as usize);
        self.detach(py, removed.bind(py).cast::<PyModel>()?)?;
        Ok(removed)
    }

    fn clear(&mut self, py: Python<'_>) -> PyResult<()> {
        for removed in std::mem::take(&mut self.items) {
            self.detach(py, removed.bind(py).cast::<PyModel>()?)?;
        }
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.items.len()
    }

    fn __bool__(&self) -> bool {
        !self.items.is_empty()
    }

    fn __getitem__<'py>(
        &self,
        py: Python<'py>,
        index: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.as_list(py)?.as_any().get_item(index)
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(self.as_list(py)?.try_iter()?.into_any())
    }

    fn __contains__(&self, obj: &Bound<'_, PyAny>) -> bool {
        self.items.iter().any(|o| o.is(obj))
    }

    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<bool> {
        if let Ok(other) = other.cast::<PyRelationshipList>() {
            return self.as_list(py)?.eq(other.borrow().as_list(py)?);
        }
        self.as_list(py)?.eq(other)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.as_list(py)?.repr()?.to_string())
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.owner)?;
        for o in &self.items {
            visit.call(o)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.items.clear();
    }
}

impl PyRelationshipList {
    pub fn items(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        self.items.iter().map(|o| o.clone_ref(py)).collect()
    }

    fn as_list<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.items.iter().map(|o| o.clone_ref(py)))
    }

    pub fn new(owner: Py<PyAny>, table: TableId, index: usize, items: Vec<Py<PyAny>>) -> Self {
        PyRelationshipList {
            owner,
            table,
            index,
            items,
        }
    }
}

/// The relationship of `table` whose key is `key` (the first, where two names share it).
fn relationship_index(table: TableId, key: RelKey) -> Option<usize> {
    TABLES[table]
        .relationships
        .iter()
        .position(|r| key_of(r) == key)
}

/// Caches `items` as `owner`'s collection `key` (from a lazy or an eager load).
pub fn set_collection(
    py: Python<'_>,
    owner: &Bound<'_, PyModel>,
    key: RelKey,
    items: Vec<Py<PyAny>>,
) -> PyResult<()> {
    let table = owner.borrow().table;
    let index = relationship_index(table, key).unwrap_or_default();
    // Each child knows its parent from now on, with no query (back_populates).
    for item in &items {
        item.bind(py).cast::<PyModel>()?.borrow_mut().set_cached(
            (RelKind::ToParent, key.1, key.2),
            Some(owner.clone().into_any().unbind()),
        );
    }
    let list = Py::new(
        py,
        PyRelationshipList::new(owner.clone().into_any().unbind(), table, index, items),
    )?;
    owner.borrow_mut().set_cached(key, Some(list.into_any()));
    Ok(())
}

fn detached(r: &Relationship, owner: TableId) -> PyErr {
    raise(
        ErrorKind::InvalidRequest,
        format!(
            "{} is not loaded and the object is not in an open session; load it (or use selectinload) while the session is open",
            describe(r, owner)
        ),
    )
}

#[pymethods]
impl PyRelationship {
    fn __get__(
        slf: &Bound<'_, Self>,
        instance: &Bound<'_, PyAny>,
        _owner: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        if instance.is_none() {
            return Ok(slf.clone().into_any().unbind());
        }
        let this = slf.get();
        let r = this.rel();
        let obj = instance.cast::<PyModel>()?;
        let key = key_of(r);
        let (cached, state, session) = {
            let m = obj.borrow();
            (
                m.cached(key).map(|c| c.clone_ref(py)),
                m.state,
                m.session(py),
            )
        };
        match r.kind {
            RelKind::ToParent => {
                let fk = obj.borrow().text(py, key.2);
                let Some(fk) = fk else {
                    return Ok(py.None());
                };
                if let Some(c) = cached {
                    if c.bind(py).cast::<PyModel>()?.borrow().pk(py).as_deref() == Some(fk.as_str())
                    {
                        return Ok(c);
                    }
                }
                let parent = match session {
                    Some(s) => {
                        exclusive(&s)?.get_by_pk(py, r.parent(), PyString::new(py, &fk).as_any())?
                    }
                    None if state == ObjState::Detached => return Err(detached(r, this.table)),
                    None => None,
                };
                obj.borrow_mut()
                    .set_cached(key, parent.as_ref().map(|p| p.clone_ref(py)));
                Ok(parent.unwrap_or_else(|| py.None()))
            }
            RelKind::ToChildren => {
                if let Some(c) = cached {
                    return Ok(c);
                }
                let items = match (state, session) {
                    (ObjState::Persistent, Some(s)) => {
                        let pk = pk_of(py, obj)?;
                        exclusive(&s)?
                            .children(py, r, &[pk])?
                            .pop()
                            .unwrap_or_default()
                    }
                    (ObjState::Detached | ObjState::Persistent, None) => {
                        return Err(detached(r, this.table))
                    }
                    _ => Vec::new(),
                };
                set_collection(py, obj, key, items)?;
                Ok(obj
                    .borrow()
                    .cached(key)
                    .map(|c| c.clone_ref(py))
                    .unwrap_or_else(|| py.None()))
            }
        }
    }

    fn __set__(
        slf: &Bound<'_, Self>,
        instance: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let r = this.rel();
        let obj = instance.cast::<PyModel>()?;
        let key = key_of(r);
        match r.kind {
            RelKind::ToParent => {
                if value.is_none() {
                    return repoint(py, obj, key, None, true);
                }
                let parent = model_of(value, r.parent(), &describe(r, this.table))?;
                same_session(py, obj, &parent)?;
                repoint(py, obj, key, Some(&parent), true)?;
                // SQLAlchemy 2's cascade: a tracked child brings its new parent into the
                // session; a tracked parent does not pull in a child that names it.
                cascade_add(py, obj, &parent)
            }
            RelKind::ToChildren => {
                // Load what is there first, so the children left out are detached.
                let current = Self::__get__(slf, instance, &py.None().into_bound(py))?;
                let list = current.bind(py).cast::<PyRelationshipList>()?;
                list.borrow_mut().replace(py, value)
            }
        }
    }

    fn __repr__(&self) -> String {
        describe(self.rel(), self.table)
    }
}

/// `selectinload(Model.relationship)` / `joinedload(...)`: load the relationship of every
/// object a query returns with one more query per 500 objects, instead of one per object.
#[pyclass(module = "cmbagent_db", name = "LoadOption", frozen)]
pub struct PyLoadOption {
    pub table: TableId,
    pub index: usize,
}

fn load_option(attr: &Bound<'_, PyAny>, what: &str) -> PyResult<PyLoadOption> {
    match attr.cast::<PyRelationship>() {
        Ok(r) => Ok(PyLoadOption {
            table: r.get().table,
            index: r.get().index,
        }),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{what}() takes a relationship attribute such as WorkflowRun.approval_requests, got {}",
            attr.repr()?
        ))),
    }
}

/// Loads the relationship for every object of the query in one more query.
#[pyfunction]
#[pyo3(signature = (attr, /))]
pub fn selectinload(attr: &Bound<'_, PyAny>) -> PyResult<PyLoadOption> {
    load_option(attr, "selectinload")
}

/// The same as `selectinload`: the related rows come in one more query, not a JOIN, so
/// `limit()` still counts parent rows.
#[pyfunction]
#[pyo3(signature = (attr, /))]
pub fn joinedload(attr: &Bound<'_, PyAny>) -> PyResult<PyLoadOption> {
    load_option(attr, "joinedload")
}

/// Fills relationship `index` of `table` on each of `objs` (objects of that table), as
/// one query per 500 objects. With `overwrite`, loaded collections are read again.
pub fn preload(
    py: Python<'_>,
    session: &Bound<'_, PyDbSession>,
    objs: &[Py<PyAny>],
    table: TableId,
    index: usize,
    overwrite: bool,
) -> PyResult<()> {
    let r = &TABLES[table].relationships[index];
    let key = key_of(r);
    let mut todo = Vec::new();
    let mut keys = Vec::new();
    for obj in objs {
        let m = obj.bind(py).cast::<PyModel>()?.clone();
        if !overwrite && m.borrow().cached(key).is_some() {
            continue;
        }
        let k = match r.kind {
            RelKind::ToParent => m.borrow().text(py, key.2),
            RelKind::ToChildren => m.borrow().pk(py),
        };
        if let Some(k) = k {
            keys.push(k);
            todo.push(m);
        } else if r.kind == RelKind::ToParent {
            m.borrow_mut().set_cached(key, None);
        }
    }
    if todo.is_empty() {
        return Ok(());
    }
    match r.kind {
        RelKind::ToChildren => {
            let lists = exclusive(session)?.children(py, r, &keys)?;
            for (m, items) in todo.iter().zip(lists) {
                set_collection(py, m, key, items)?;
            }
        }
        RelKind::ToParent => {
            let parents = exclusive(session)?.by_pks(py, r.parent(), &keys)?;
            for (m, k) in todo.iter().zip(&keys) {
                m.borrow_mut()
                    .set_cached(key, parents.get(k).map(|p| p.clone_ref(py)));
            }
        }
    }
    Ok(())
}

/// Puts a [`PyRelationship`] on each model class for each relationship of its table.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    for (table, t) in TableId::all() {
        let cls = m.getattr(t.model)?;
        for (index, r) in t.relationships.iter().enumerate() {
            cls.setattr(r.name, PyRelationship { table, index })?;
        }
    }
    m.add_class::<PyRelationship>()?;
    m.add_class::<PyRelationshipList>()?;
    m.add_class::<PyLoadOption>()?;
    m.add_function(wrap_pyfunction!(selectinload, m)?)?;
    m.add_function(wrap_pyfunction!(joinedload, m)?)?;
    Ok(())
}
