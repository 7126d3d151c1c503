//! `DbSession`: SQLAlchemy's Session semantics (autoflush=False, expire_on_commit=False)
//! over the Rust core. Objects added or loaded are tracked until the session closes; a
//! primary key maps to one object; `flush` writes pending inserts, changed columns and
//! deletes in foreign-key order inside one transaction.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple, PyWeakrefReference};

use crate::backend::{Conn, Row};
use crate::dialect::Dialect;
use crate::engine::Engine;
use crate::error::{Error, ErrorKind, Result};
use crate::expr::{ColRef, Expr};
use crate::pool::Pooled;
use crate::python::convert::{to_py_from, to_value, Purpose};
use crate::python::dbapi::PyDbapiConnection;
use crate::python::errors::raise;
use crate::python::expression::PyColumn;
use crate::python::log;
use crate::python::model::{instantiate, sqlalchemy_hint, table_of_class, PyModel, Slot};
use crate::python::query::PyQuery;
use crate::python::relationship::PyRelationshipList;
use crate::query::{self, Item, Output, Select};
use crate::schema::{table_by_name, ColType, Relationship, Table, TableId, TABLES};
use crate::unit_of_work::{
    after_deletes, ChangedRow, Flush, Identity, NewRow, ObjState, References,
};
use crate::value::{now_micros, Value};

/// Which of a session's changes a flush writes: the new and changed objects of some
/// tables (one bit per table), and the deletions or not.
#[derive(Clone, Copy)]
struct FlushScope {
    tables: u8,
    deletes: bool,
}

impl FlushScope {
    const ALL: FlushScope = FlushScope {
        tables: u8::MAX,
        deletes: true,
    };

    fn takes(&self, table: TableId) -> bool {
        self.tables & (1 << table.index()) != 0
    }
}

#[pyclass(module = "cmbagent_db", name = "DbSession", weakref)]
pub struct PyDbSession {
    engine: Arc<Engine>,
    /// A weak reference to this session, which every object it tracks holds: objects reach
    /// their session through it (to load a relationship), and the session knows its own
    /// objects by it.
    this: Option<Py<PyWeakrefReference>>,
    /// The connection holding this session's open transaction, if one is open. Reads
    /// outside a transaction borrow a pooled connection for the one statement.
    /// (A Mutex only to make the class `Sync`; `&mut self` access uses `get_mut`.)
    conn: Mutex<Option<Held>>,
    /// The DB-API connection this session runs on instead of its engine's pool (a session
    /// of `cmbagent_db.sqlalchemy`, sharing SQLAlchemy's connection and transaction).
    lender: Option<Py<PyDbapiConnection>>,
    /// A weak reference to the `cmbagent_db.sqlalchemy` session running on this one, set
    /// by it: the relationship attributes of this session's objects find it here.
    #[pyo3(get, set, name = "_bridge")]
    bridge: Option<Py<PyWeakrefReference>>,
    identity: HashMap<Identity, Py<PyAny>>,
    /// Added, not yet inserted, in the order they were added.
    pending: Vec<Py<PyAny>>,
    /// Marked for deletion, not yet deleted.
    to_delete: Vec<Py<PyAny>>,
    /// Written in the open transaction, undone on rollback.
    tx_inserted: Vec<Py<PyAny>>,
    tx_updated: Vec<Py<PyAny>>,
    tx_deleted: Vec<Py<PyAny>>,
    /// Why the open transaction was rolled back, until `rollback()` acknowledges it.
    failed: Option<String>,
}

fn model<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyModel>> {
    obj.cast::<PyModel>().cloned().map_err(|_| {
        raise(
            ErrorKind::InvalidRequest,
            format!(
                "{} is not a mapped object (Session, WorkflowRun, SessionState, ApprovalRequest or ActiveConnection){}",
                obj.repr().map(|r| r.to_string()).unwrap_or_default(),
                sqlalchemy_hint(obj)
            ),
        )
    })
}

/// The identity-map key of a row read from the database.
fn row_pk(row: &Row) -> String {
    match &row[Table::PK] {
        Value::Text(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

fn pk_filter(table: TableId, pks: Vec<String>) -> Expr {
    Expr::In(
        ColRef::new(table, Table::PK),
        pks.into_iter().map(Value::Text).collect(),
        false,
    )
}

/// The connection a session's transaction runs on: one from its engine's pool, or the one
/// a DB-API connection lends it.
// One per session, never in a collection: boxing the pooled connection would only add an
// allocation to every transaction.
#[allow(clippy::large_enum_variant)]
pub enum Held {
    Pooled(Pooled),
    Lent(Py<PyDbapiConnection>),
}

impl Held {
    /// Runs `f` on the connection (no GIL needed).
    fn run<T>(&mut self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        match self {
            Held::Pooled(p) => f(p),
            Held::Lent(c) => c.get().run(f),
        }
    }

    fn inherited(&self) -> bool {
        match self {
            Held::Pooled(p) => p.inherited(),
            // The DB-API connection notices a fork itself and reports it when used.
            Held::Lent(_) => false,
        }
    }

    fn in_transaction(&mut self) -> bool {
        self.run(|c| Ok(c.in_transaction())).unwrap_or(false)
    }
}

impl PyDbSession {
    pub fn open(py: Python<'_>, engine: Arc<Engine>) -> PyResult<Py<PyDbSession>> {
        Self::open_on(py, engine, None)
    }

    /// A session on `lender`'s connection (its statements and transaction), or on the
    /// engine's pool when there is none.
    pub fn open_on(
        py: Python<'_>,
        engine: Arc<Engine>,
        lender: Option<Py<PyDbapiConnection>>,
    ) -> PyResult<Py<PyDbSession>> {
        let mut session = PyDbSession::new(engine);
        session.lender = lender;
        let session = Py::new(py, session)?;
        let this = PyWeakrefReference::new(session.bind(py))?.unbind();
        session.borrow_mut(py).this = Some(this);
        Ok(session)
    }

    fn new(engine: Arc<Engine>) -> PyDbSession {
        PyDbSession {
            engine,
            this: None,
            conn: Mutex::new(None),
            lender: None,
            bridge: None,
            identity: HashMap::new(),
            pending: Vec::new(),
            to_delete: Vec::new(),
            tx_inserted: Vec::new(),
            tx_updated: Vec::new(),
            tx_deleted: Vec::new(),
            failed: None,
        }
    }

    /// The link objects tracked by this session hold.
    fn link(&self, py: Python<'_>) -> Option<Py<PyWeakrefReference>> {
        self.this.as_ref().map(|w| w.clone_ref(py))
    }

    /// Whether `m` is tracked by this session.
    fn owns(&self, m: &PyModel) -> bool {
        match (&m.session, &self.this) {
            (Some(a), Some(b)) => a.is(b),
            _ => false,
        }
    }

    pub fn dialect(&self) -> Dialect {
        self.engine.dialect()
    }

    fn slot(&mut self) -> &mut Option<Held> {
        let slot = self.conn.get_mut().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            if let Some(lender) = &self.lender {
                *slot = Some(Held::Lent(Python::attach(|py| lender.clone_ref(py))));
            }
        }
        if slot.as_ref().is_some_and(Held::inherited) {
            // A transaction the parent opened before fork(): it is the parent's to finish.
            // Its connection is left to the parent, and this copy of the session must
            // roll back before it starts again on a connection of its own.
            *slot = None;
            self.failed =
                Some("its transaction was opened by the parent process before fork()".to_string());
        }
        slot
    }

    fn check_usable(&mut self) -> PyResult<()> {
        // Notices a transaction inherited through fork() (see `slot`).
        self.slot();
        match &self.failed {
            None => Ok(()),
            Some(why) => Err(raise(
                ErrorKind::PendingRollback,
                format!(
                    "this session's transaction was rolled back because of an earlier error ({why}); \
                     call rollback() before using the session again"
                ),
            )),
        }
    }

    /// Runs `f` with the GIL released, on the open transaction's connection or, when
    /// none is open, on a pooled connection for this call only.
    pub fn read<T: Send>(
        &mut self,
        py: Python<'_>,
        f: impl FnMut(&mut Conn) -> Result<T> + Send,
    ) -> PyResult<T> {
        self.check_usable()?;
        let engine = self.engine.clone();
        let slot = self.slot();
        let result = py.detach(|| match slot {
            Some(conn) => conn.run(f),
            None => engine.with_conn(f),
        });
        log::flush(py);
        result.map_err(PyErr::from)
    }

    /// Runs `f` inside this session's write transaction (opened if needed). On error the
    /// transaction is rolled back and the session needs `rollback()` before reuse.
    pub fn write<T: Send>(
        &mut self,
        py: Python<'_>,
        f: impl FnOnce(&mut Conn) -> Result<T> + Send,
    ) -> PyResult<T> {
        self.check_usable()?;
        let engine = self.engine.clone();
        let slot = self.slot();
        let result = py.detach(|| {
            if slot.is_none() {
                *slot = Some(Held::Pooled(engine.begin_write()?));
            }
            let conn = slot
                .as_mut()
                .ok_or_else(|| Error::internal("no connection"))?;
            conn.run(|c| {
                c.begin_write()?;
                f(c)
            })
        });
        log::flush(py);
        result.map_err(|e| self.fail(py, e))
    }

    fn fail(&mut self, py: Python<'_>, e: Error) -> PyErr {
        let slot = self.slot();
        if let Some(mut conn) = slot.take() {
            // The error is what the caller needs to see; a failed ROLLBACK only means the
            // connection is gone, and the pool drops broken connections.
            let _ = py.detach(|| conn.run(Conn::rollback));
        }
        self.failed = Some(e.message.clone());
        e.into()
    }

    /// Objects for rows of `table` (all columns), reusing the ones already tracked. With
    /// `overwrite`, tracked objects without unsaved changes take the row's values
    /// (SQLAlchemy's `populate_existing`).
    pub fn load(
        &mut self,
        py: Python<'_>,
        table: TableId,
        rows: Vec<Row>,
        overwrite: bool,
    ) -> PyResult<Vec<Py<PyAny>>> {
        rows.into_iter()
            .map(|row| self.object(py, table, row, overwrite))
            .collect()
    }

    /// The object for one row of `table` (all columns), through the identity map.
    fn object(
        &mut self,
        py: Python<'_>,
        table: TableId,
        row: Row,
        overwrite: bool,
    ) -> PyResult<Py<PyAny>> {
        match self.identity.entry((table, row_pk(&row))) {
            Entry::Occupied(tracked) => {
                let obj = tracked.get().clone_ref(py);
                if overwrite {
                    let b = obj.bind(py).cast::<PyModel>()?.clone();
                    let mut m = b.borrow_mut();
                    if m.dirty == 0 {
                        m.values = row.into_iter().map(Slot::Raw).collect();
                        m.related.clear();
                    }
                }
                Ok(obj)
            }
            Entry::Vacant(slot) => {
                let link = self.this.as_ref().map(|w| w.clone_ref(py));
                let obj = instantiate(py, PyModel::loaded(table, row, link))?;
                Ok(slot.insert(obj).clone_ref(py))
            }
        }
    }

    /// The rows `select` reads, each value typed as its item.
    fn rows(&mut self, py: Python<'_>, select: &Select) -> PyResult<Vec<Row>> {
        let (sql, params) = select.render(self.dialect());
        let shape = select.shape();
        self.read(py, move |c| c.query(&sql, &params, &shape))
    }

    /// Objects for the rows of `select`, which reads every column of one model.
    pub fn fetch(
        &mut self,
        py: Python<'_>,
        select: &Select,
        overwrite: bool,
    ) -> PyResult<Vec<Py<PyAny>>> {
        let rows = self.rows(py, select)?;
        self.load(py, select.from.table, rows, overwrite)
    }

    /// What a query of several entities or columns returns: for each row, the objects
    /// and values `outputs` describe (a tuple), or the object alone when the query is of
    /// one model; those are returned once each however many joined rows repeat them, as
    /// SQLAlchemy's `Query` does. An entity whose key is NULL (an outer join that found
    /// nothing) is None.
    pub fn fetch_rows(
        &mut self,
        py: Python<'_>,
        select: &Select,
        outputs: &[Output],
        overwrite: bool,
    ) -> PyResult<Vec<Py<PyAny>>> {
        let rows = self.rows(py, select)?;
        if let [Output::Entity { table, start: 0 }] = outputs {
            let mut seen = HashSet::new();
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                if let Some(obj) = self.entity(py, *table, row, overwrite)? {
                    if seen.insert(obj.as_ptr() as usize) {
                        out.push(obj);
                    }
                }
            }
            return Ok(out);
        }
        let mut out = Vec::with_capacity(rows.len());
        for mut row in rows {
            let mut items = Vec::with_capacity(outputs.len());
            for &o in outputs {
                items.push(match o {
                    Output::Entity { table, start } => {
                        let end = start + TABLES[table].columns.len();
                        let values = row[start..end]
                            .iter_mut()
                            .map(|v| std::mem::replace(v, Value::Null))
                            .collect();
                        self.entity(py, table, values, overwrite)?
                            .unwrap_or_else(|| py.None())
                    }
                    Output::Value(i) => {
                        let item = select.items[i];
                        to_py_from(py, &row[i], &|| item.describe())?
                    }
                });
            }
            out.push(PyTuple::new(py, items)?.into_any().unbind());
        }
        Ok(out)
    }

    /// An object for a row of `table`, or None when its primary key is NULL.
    fn entity(
        &mut self,
        py: Python<'_>,
        table: TableId,
        row: Row,
        overwrite: bool,
    ) -> PyResult<Option<Py<PyAny>>> {
        if matches!(row.get(Table::PK), None | Some(Value::Null)) {
            return Ok(None);
        }
        self.object(py, table, row, overwrite).map(Some)
    }

    pub fn count(&mut self, py: Python<'_>, select: &Select) -> PyResult<i64> {
        let (sql, params) = select.render_count(self.dialect());
        let rows = self.read(py, move |c| {
            c.query(&sql, &params, &[("count", ColType::BigInt)])
        })?;
        match rows.first().and_then(|r| r.first()) {
            Some(Value::Int(n)) => Ok(*n),
            _ => Ok(0),
        }
    }

    /// `query(M).filter(...).update({...})`: one UPDATE; tracked objects it matched take
    /// the new values. Returns the number of rows matched.
    pub fn bulk_update(
        &mut self,
        py: Python<'_>,
        table: TableId,
        filters: &[Expr],
        values: &Bound<'_, PyDict>,
    ) -> PyResult<usize> {
        let t = &TABLES[table];
        let mut set: Vec<(usize, Value)> = Vec::new();
        for (k, v) in values.iter() {
            let column = match k.cast::<PyColumn>() {
                Ok(c) if c.get().col.table == table => c.get().col.column,
                Ok(c) => {
                    return Err(raise(
                        ErrorKind::InvalidRequest,
                        format!(
                            "update() of {} cannot set {}",
                            t.name,
                            c.get().col.qualified()
                        ),
                    ))
                }
                Err(_) => {
                    let name: String = k.extract()?;
                    t.column_index(&name)
                        .ok_or_else(|| unknown_column(table, &name))?
                }
            };
            let col = ColRef::new(table, column);
            set.push((column, to_value(col, &v, Purpose::Store)?));
        }
        if set.is_empty() {
            return Ok(0);
        }
        for (column, c) in t.columns.iter().enumerate() {
            if c.on_update_now && !set.iter().any(|(i, _)| *i == column) {
                set.push((column, Value::Timestamp(now_micros())));
            }
        }
        let (sql, params) = query::update(self.dialect(), table, &set, filters);
        let shape = TABLES[table].shape(&[Table::PK]);
        let rows = self.write(py, move |c| c.query(&sql, &params, &shape))?;
        for row in &rows {
            if let Some(Value::Text(pk)) = row.first() {
                if let Some(obj) = self.identity.get(&(table, pk.clone())) {
                    let b = obj.bind(py).cast::<PyModel>()?.clone();
                    let mut m = b.borrow_mut();
                    for (column, v) in &set {
                        m.values[*column] = Slot::Raw(v.clone());
                        m.dirty &= !(1 << column);
                    }
                    self.tx_updated.push(obj.clone_ref(py));
                }
            }
        }
        Ok(rows.len())
    }

    /// `query(M).filter(...).delete()`: one DELETE; tracked objects it matched are
    /// deleted. Returns the number of rows deleted.
    pub fn bulk_delete(
        &mut self,
        py: Python<'_>,
        table: TableId,
        filters: &[Expr],
    ) -> PyResult<usize> {
        let (sql, params) = query::delete(self.dialect(), table, filters);
        let shape = TABLES[table].shape(&[Table::PK]);
        let rows = self.write(py, move |c| c.query(&sql, &params, &shape))?;
        let mut deleted = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(Value::Text(pk)) = row.first() {
                if let Some(obj) = self.identity.remove(&(table, pk.clone())) {
                    obj.bind(py).cast::<PyModel>()?.borrow_mut().state = ObjState::Deleted;
                    self.tx_deleted.push(obj);
                }
                deleted.push((table, pk.clone()));
            }
        }
        self.follow_deletes(py, deleted)?;
        Ok(rows.len())
    }

    /// Applies the database's ON DELETE rules to tracked objects once `deleted` rows are
    /// gone: CASCADE children are deleted too, SET NULL references become None.
    fn follow_deletes(&mut self, py: Python<'_>, deleted: Vec<Identity>) -> PyResult<()> {
        if deleted.is_empty() {
            return Ok(());
        }
        let mut tracked = Vec::new();
        let mut objs = Vec::new();
        for ((table, pk), obj) in &self.identity {
            let m = obj.bind(py).cast::<PyModel>()?.borrow();
            let refs: Vec<(usize, String)> = TABLES[*table]
                .columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.foreign_key.is_some())
                .filter_map(|(i, _)| m.text(py, i).map(|v| (i, v)))
                .collect();
            if !refs.is_empty() {
                tracked.push(References {
                    table: *table,
                    pk: pk.clone(),
                    refs,
                });
                objs.push(obj.clone_ref(py));
            }
        }
        let effects = after_deletes(&deleted, &tracked);
        for (n, column) in effects.nulled {
            objs[n].bind(py).cast::<PyModel>()?.borrow_mut().values[column] =
                Slot::Raw(Value::Null);
        }
        for n in effects.deleted {
            let r = &tracked[n];
            if let Some(obj) = self.identity.remove(&(r.table, r.pk.clone())) {
                obj.bind(py).cast::<PyModel>()?.borrow_mut().state = ObjState::Deleted;
                self.tx_deleted.push(obj);
            }
        }
        Ok(())
    }

    /// The children each of `parents` has through `r` (a one-to-many relationship), one
    /// list per parent key in order, each ordered by primary key; a few queries for any
    /// number of parents.
    pub fn children(
        &mut self,
        py: Python<'_>,
        r: &Relationship,
        parents: &[String],
    ) -> PyResult<Vec<Vec<Py<PyAny>>>> {
        let column = r.column_index();
        let mut by_parent: HashMap<&str, Vec<Py<PyAny>>> = HashMap::new();
        for chunk in parents.chunks(500) {
            let mut select = Select::all_columns(r.child);
            select.filters.push(Expr::In(
                ColRef::new(r.child, column),
                chunk.iter().cloned().map(Value::Text).collect(),
                false,
            ));
            select
                .order_by
                .push((Item::Column(ColRef::new(r.child, Table::PK)), false));
            for obj in self.fetch(py, &select, false)? {
                let fk = obj.bind(py).cast::<PyModel>()?.borrow().text(py, column);
                if let Some(pk) = fk.and_then(|fk| parents.iter().find(|p| **p == fk)) {
                    by_parent.entry(pk.as_str()).or_default().push(obj);
                }
            }
        }
        Ok(parents
            .iter()
            .map(|p| by_parent.remove(p.as_str()).unwrap_or_default())
            .collect())
    }

    /// The objects of `table` with these keys, from the identity map or, for the ones not
    /// tracked, from one query per 500 keys; a key without a row is left out.
    pub fn by_pks(
        &mut self,
        py: Python<'_>,
        table: TableId,
        pks: &[String],
    ) -> PyResult<HashMap<String, Py<PyAny>>> {
        self.check_usable()?;
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        for pk in pks {
            match self.identity.get(&(table, pk.clone())) {
                Some(obj) => {
                    found.insert(pk.clone(), obj.clone_ref(py));
                }
                None => missing.push(pk.clone()),
            }
        }
        missing.sort();
        missing.dedup();
        for chunk in missing.chunks(500) {
            let mut select = Select::all_columns(table);
            select.filters.push(pk_filter(table, chunk.to_vec()));
            for obj in self.fetch(py, &select, false)? {
                if let Some(pk) = obj.bind(py).cast::<PyModel>()?.borrow().pk(py) {
                    found.insert(pk, obj);
                }
            }
        }
        Ok(found)
    }

    /// The object with primary key `pk`, from the identity map or the database.
    pub fn get_by_pk(
        &mut self,
        py: Python<'_>,
        table: TableId,
        pk: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Py<PyAny>>> {
        self.check_usable()?;
        let key = match to_value(ColRef::new(table, Table::PK), pk, Purpose::Compare)? {
            Value::Text(s) => s,
            _ => return Ok(None),
        };
        if let Some(obj) = self.identity.get(&(table, key.clone())) {
            return Ok(Some(obj.clone_ref(py)));
        }
        let mut select = Select::all_columns(table);
        select.filters.push(pk_filter(table, vec![key]));
        Ok(self.fetch(py, &select, false)?.into_iter().next())
    }

    /// Reloads tracked objects from their rows; objects whose row is gone are dropped
    /// from the session.
    fn reload(&mut self, py: Python<'_>, objs: Vec<Py<PyAny>>) -> PyResult<()> {
        let mut by_table: HashMap<TableId, Vec<(String, Py<PyAny>)>> = HashMap::new();
        for obj in objs {
            let m = obj.bind(py).cast::<PyModel>()?.borrow();
            if let Some(pk) = m.pk(py) {
                let table = m.table;
                drop(m);
                by_table.entry(table).or_default().push((pk, obj));
            }
        }
        for (table, objs) in by_table {
            let mut select = Select::all_columns(table);
            select.filters.push(pk_filter(
                table,
                objs.iter().map(|(pk, _)| pk.clone()).collect(),
            ));
            let rows = self.rows(py, &select)?;
            let mut found: HashMap<String, Row> = HashMap::new();
            for row in rows {
                if let Value::Text(pk) = &row[Table::PK] {
                    found.insert(pk.clone(), row);
                }
            }
            for (pk, obj) in objs {
                let b = obj.bind(py).cast::<PyModel>()?.clone();
                match found.remove(&pk) {
                    Some(row) => {
                        let values = row.into_iter().map(Slot::Raw).collect();
                        let mut m = b.borrow_mut();
                        m.values = values;
                        m.dirty = 0;
                        m.related.clear();
                    }
                    None => {
                        self.identity.remove(&(table, pk));
                        let mut m = b.borrow_mut();
                        m.state = ObjState::Transient;
                        m.session = None;
                    }
                }
            }
        }
        Ok(())
    }

    fn release(&mut self, obj: &Bound<'_, PyAny>, state: ObjState) -> PyResult<()> {
        let mut m = obj.cast::<PyModel>()?.borrow_mut();
        m.state = state;
        m.session = None;
        Ok(())
    }

    /// Writes with `f` in this session's transaction, then commits everything pending, as
    /// the lifecycle services do ("every call that writes commits before returning").
    pub fn write_and_commit<T: Send>(
        &mut self,
        py: Python<'_>,
        f: impl FnOnce(&mut Conn) -> Result<T> + Send,
    ) -> PyResult<T> {
        let out = self.write(py, f)?;
        self.do_commit(py)?;
        Ok(out)
    }

    /// The tracked object for a row just written elsewhere, updated to the row's values,
    /// or a newly tracked one.
    pub fn merge_row(&mut self, py: Python<'_>, table: TableId, row: Row) -> PyResult<Py<PyAny>> {
        match self.identity.get(&(table, row_pk(&row))) {
            Some(obj) => {
                let obj = obj.clone_ref(py);
                let values = row.into_iter().map(Slot::Raw).collect();
                let b = obj.bind(py).cast::<PyModel>()?.clone();
                let mut m = b.borrow_mut();
                m.values = values;
                m.dirty = 0;
                Ok(obj.clone_ref(py))
            }
            None => self.object(py, table, row, false),
        }
    }

    /// Reads tracked objects of `table` with these ids again (after a service changed
    /// their rows); untracked ids are ignored.
    pub fn refresh_ids(&mut self, py: Python<'_>, table: TableId, ids: &[String]) -> PyResult<()> {
        let objs: Vec<Py<PyAny>> = ids
            .iter()
            .filter_map(|id| {
                self.identity
                    .get(&(table, id.clone()))
                    .map(|o| o.clone_ref(py))
            })
            .collect();
        if objs.is_empty() {
            return Ok(());
        }
        self.reload(py, objs)
    }

    /// Stops tracking objects whose rows a service deleted.
    pub fn forget_ids(&mut self, py: Python<'_>, table: TableId, ids: &[String]) -> PyResult<()> {
        for id in ids {
            if let Some(obj) = self.identity.remove(&(table, id.clone())) {
                self.release(obj.bind(py), ObjState::Detached)?;
            }
        }
        Ok(())
    }

    fn do_commit(&mut self, py: Python<'_>) -> PyResult<()> {
        self.do_flush(py, FlushScope::ALL)?;
        if let Some(mut conn) = self.slot().take() {
            let committed = py.detach(|| conn.run(Conn::commit));
            log::flush(py);
            if let Err(e) = committed {
                *self.slot() = Some(conn);
                return Err(self.fail(py, e));
            }
        }
        for obj in std::mem::take(&mut self.tx_deleted) {
            self.release(obj.bind(py), ObjState::Detached)?;
        }
        self.tx_inserted.clear();
        self.tx_updated.clear();
        Ok(())
    }

    fn do_flush(&mut self, py: Python<'_>, scope: FlushScope) -> PyResult<()> {
        self.check_usable()?;
        if scope.tables == FlushScope::ALL.tables {
            // Every pending object is taken: no need to sort them out (every commit).
            return self.flush_pending(py, scope);
        }
        let (pending, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|obj| {
                obj.bind(py)
                    .cast::<PyModel>()
                    .is_ok_and(|m| scope.takes(m.borrow().table))
            });
        self.pending = pending;
        let result = self.flush_pending(py, scope);
        let written = std::mem::replace(&mut self.pending, kept);
        self.pending.extend(written);
        result
    }

    /// Flushes what `scope` takes; `self.pending` holds only the new objects it takes and
    /// is empty after a successful flush.
    fn flush_pending(&mut self, py: Python<'_>, scope: FlushScope) -> PyResult<()> {
        // Collect plain values (checking every assigned one) before anything is written.
        let mut new = Vec::with_capacity(self.pending.len());
        for obj in &self.pending {
            let m = obj.bind(py).cast::<PyModel>()?.borrow();
            let values = (0..m.values.len())
                .map(|column| m.value(py, column))
                .collect::<PyResult<Vec<_>>>()?;
            new.push(NewRow {
                table: m.table,
                values,
            });
        }
        let mut changed = Vec::new();
        let mut changed_objs = Vec::new();
        for ((table, pk), obj) in &self.identity {
            let m = obj.bind(py).cast::<PyModel>()?.borrow();
            if m.dirty == 0 || m.state != ObjState::Persistent || !scope.takes(*table) {
                continue;
            }
            let columns = (0..m.values.len())
                .filter(|column| m.dirty & (1 << column) != 0)
                .map(|column| Ok((column, m.value(py, column)?)))
                .collect::<PyResult<Vec<_>>>()?;
            changed.push(ChangedRow {
                table: *table,
                pk: pk.clone(),
                columns,
            });
            changed_objs.push(obj.clone_ref(py));
        }
        let to_delete: &[Py<PyAny>] = if scope.deletes { &self.to_delete } else { &[] };
        let mut deleted = Vec::with_capacity(to_delete.len());
        for obj in to_delete {
            let m = obj.bind(py).cast::<PyModel>()?.borrow();
            if let Some(pk) = m.pk(py) {
                deleted.push((m.table, pk));
            }
        }
        let mut flush = Flush::plan(new, changed, deleted, now_micros);
        if flush.writes.is_empty() {
            return Ok(());
        }
        let writes = std::mem::take(&mut flush.writes);
        self.write(py, move |c| writes.execute(c))?;

        // Written: the objects take the values the flush chose and their new states.
        let pending = std::mem::take(&mut self.pending);
        for f in flush.filled_new {
            pending[f.object]
                .bind(py)
                .cast::<PyModel>()?
                .borrow_mut()
                .values[f.column] = Slot::Raw(f.value);
        }
        for obj in pending {
            let b = obj.bind(py).cast::<PyModel>()?.clone();
            let mut m = b.borrow_mut();
            m.state = ObjState::Persistent;
            m.dirty = 0;
            if let Some(pk) = m.pk(py) {
                self.identity.insert((m.table, pk), obj.clone_ref(py));
            }
            drop(m);
            self.tx_inserted.push(obj);
        }
        for f in flush.filled_changed {
            changed_objs[f.object]
                .bind(py)
                .cast::<PyModel>()?
                .borrow_mut()
                .values[f.column] = Slot::Raw(f.value);
        }
        for n in flush.update_order {
            let obj = changed_objs[n].clone_ref(py);
            obj.bind(py).cast::<PyModel>()?.borrow_mut().dirty = 0;
            self.tx_updated.push(obj);
        }
        let deleted_objs = if scope.deletes {
            std::mem::take(&mut self.to_delete)
        } else {
            Vec::new()
        };
        for obj in deleted_objs {
            let b = obj.bind(py).cast::<PyModel>()?.clone();
            let mut m = b.borrow_mut();
            if let Some(pk) = m.pk(py) {
                self.identity.remove(&(m.table, pk));
            }
            m.state = ObjState::Deleted;
            drop(m);
            self.tx_deleted.push(obj);
        }
        self.follow_deletes(py, flush.deleted)
    }

    fn do_rollback(&mut self, py: Python<'_>) -> PyResult<()> {
        if let Some(mut conn) = self.slot().take() {
            // Returning the connection to the pool rolls it back; do it here so a
            // broken connection's error is not lost silently either way.
            let _ = py.detach(|| conn.run(Conn::rollback));
        }
        self.failed = None;
        let pending = std::mem::take(&mut self.pending);
        for obj in pending {
            self.release(obj.bind(py), ObjState::Transient)?;
        }
        for obj in std::mem::take(&mut self.tx_inserted) {
            let pk = obj.bind(py).cast::<PyModel>()?.borrow().pk(py);
            let table = obj.bind(py).cast::<PyModel>()?.borrow().table;
            if let Some(pk) = pk {
                self.identity.remove(&(table, pk));
            }
            self.release(obj.bind(py), ObjState::Transient)?;
        }
        for obj in std::mem::take(&mut self.tx_deleted) {
            let b = obj.bind(py).cast::<PyModel>()?.clone();
            let mut m = b.borrow_mut();
            m.state = ObjState::Persistent;
            if let Some(pk) = m.pk(py) {
                self.identity.insert((m.table, pk), obj.clone_ref(py));
            }
        }
        self.to_delete.clear();
        // What the rolled-back transaction changed, or was about to, is read again.
        let mut stale = std::mem::take(&mut self.tx_updated);
        for obj in self.identity.values() {
            if obj.bind(py).cast::<PyModel>()?.borrow().dirty != 0 {
                stale.push(obj.clone_ref(py));
            }
        }
        let mut seen = HashSet::new();
        stale.retain(|o| seen.insert(o.as_ptr() as usize));
        if !stale.is_empty() {
            self.reload(py, stale)?;
        }
        Ok(())
    }

    fn do_expunge_all(&mut self, py: Python<'_>) -> PyResult<()> {
        for (_, obj) in std::mem::take(&mut self.identity) {
            self.release(obj.bind(py), ObjState::Detached)?;
        }
        for obj in std::mem::take(&mut self.pending) {
            self.release(obj.bind(py), ObjState::Transient)?;
        }
        self.to_delete.clear();
        self.tx_inserted.clear();
        self.tx_updated.clear();
        self.tx_deleted.clear();
        Ok(())
    }

    /// `add` for one object, without the cascade.
    fn track(&mut self, obj: &Bound<'_, PyAny>, b: &Bound<'_, PyModel>) -> PyResult<()> {
        let py = obj.py();
        let mut m = b.borrow_mut();
        if !self.owns(&m) && m.session(py).is_some() {
            return Err(raise(
                ErrorKind::InvalidRequest,
                format!(
                    "{} is already attached to another session; close that one or expunge it first",
                    TABLES[m.table].model
                ),
            ));
        }
        match m.state {
            ObjState::Transient => {
                m.state = ObjState::Pending;
                m.session = self.link(py);
                self.pending.push(obj.clone().unbind());
            }
            ObjState::Detached => {
                let pk = m.pk(py).unwrap_or_default();
                if let Some(other) = self.identity.get(&(m.table, pk.clone())) {
                    if !other.is(obj) {
                        return Err(raise(
                            ErrorKind::InvalidRequest,
                            format!(
                                "another {} with id {pk:?} is already in this session",
                                TABLES[m.table].model
                            ),
                        ));
                    }
                }
                m.state = ObjState::Persistent;
                m.session = self.link(py);
                self.identity.insert((m.table, pk), obj.clone().unbind());
            }
            ObjState::Deleted => {
                return Err(raise(
                    ErrorKind::InvalidRequest,
                    format!(
                        "{} was deleted in this transaction; commit or roll back first",
                        TABLES[m.table].model
                    ),
                ))
            }
            ObjState::Pending | ObjState::Persistent => {
                self.to_delete.retain(|o| !o.is(obj));
            }
        }
        Ok(())
    }
}

fn unknown_column(table: TableId, name: &str) -> PyErr {
    let t = &TABLES[table];
    raise(
        ErrorKind::InvalidRequest,
        format!(
            "{} has no column {name:?}; its columns are {}",
            t.model,
            t.column_names()
        ),
    )
}

pub fn column_of(table: TableId, name: &str) -> PyResult<usize> {
    TABLES[table]
        .column_index(name)
        .ok_or_else(|| unknown_column(table, name))
}

/// The bodies of the methods that take a session borrowed for one call (see `exclusive`).
impl PyDbSession {
    /// Tracks a new object (inserted at the next flush) or re-attaches a detached one.
    pub(crate) fn add_object(&mut self, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = obj.py();
        let b = model(obj)?;
        let was_transient = b.borrow().state == ObjState::Transient;
        self.track(obj, &b)?;
        if was_transient {
            // Save-update cascade: new objects it refers to, or holds in a collection,
            // are added with it.
            let related: Vec<Py<PyAny>> = b
                .borrow()
                .related
                .iter()
                .map(|(_, o)| o.clone_ref(py))
                .collect();
            for r in related {
                let r = r.bind(py);
                let members: Vec<Py<PyAny>> = match r.cast::<PyRelationshipList>() {
                    Ok(list) => list.borrow().items(py),
                    Err(_) => vec![r.clone().unbind()],
                };
                for o in members {
                    let o = o.bind(py);
                    if o.cast::<PyModel>()?.borrow().state == ObjState::Transient {
                        self.add_object(o)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Marks a persistent object for deletion at the next flush.
    pub(crate) fn delete_object(&mut self, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        let b = model(obj)?;
        let state = b.borrow().state;
        match state {
            ObjState::Persistent | ObjState::Detached => {
                if state == ObjState::Detached {
                    self.add_object(obj)?;
                }
                if !self.to_delete.iter().any(|o| o.is(obj)) {
                    self.to_delete.push(obj.clone().unbind());
                }
                Ok(())
            }
            ObjState::Deleted => Ok(()),
            ObjState::Transient | ObjState::Pending => Err(raise(
                ErrorKind::InvalidRequest,
                format!("{} is not persisted, so it cannot be deleted (expunge a pending object instead)", TABLES[b.borrow().table].model),
            )),
        }
    }

    pub(crate) fn expunge_object(&mut self, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = obj.py();
        let b = model(obj)?;
        let (table, pk) = {
            let m = b.borrow();
            (m.table, m.pk(py))
        };
        if let Some(pk) = pk {
            if self
                .identity
                .get(&(table, pk.clone()))
                .is_some_and(|o| o.is(obj))
            {
                self.identity.remove(&(table, pk));
            }
        }
        let was_pending = self.pending.iter().any(|o| o.is(obj));
        self.pending.retain(|o| !o.is(obj));
        self.to_delete.retain(|o| !o.is(obj));
        self.release(
            obj,
            if was_pending {
                ObjState::Transient
            } else {
                ObjState::Detached
            },
        )
    }

    /// Reads the object's row again, discarding unsaved changes.
    fn refresh_object(&mut self, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = obj.py();
        let b = model(obj)?;
        let (table, pk, tracked) = {
            let m = b.borrow();
            (
                m.table,
                m.pk(py),
                self.owns(&m) && m.state == ObjState::Persistent,
            )
        };
        if !tracked {
            return Err(raise(
                ErrorKind::InvalidRequest,
                format!("{} is not persistent in this session", TABLES[table].model),
            ));
        }
        self.reload(py, vec![obj.clone().unbind()])?;
        if !self.owns(&b.borrow()) {
            return Err(raise(
                ErrorKind::InvalidRequest,
                format!(
                    "could not refresh {}: row {:?} no longer exists",
                    TABLES[table].model,
                    pk.unwrap_or_default()
                ),
            ));
        }
        Ok(())
    }

    /// The object of `model` with primary key `ident`, or None.
    fn get_object(
        &mut self,
        py: Python<'_>,
        model: &Bound<'_, PyAny>,
        ident: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let table = table_of_class(model).ok_or_else(|| {
            raise(
                ErrorKind::InvalidRequest,
                format!(
                    "{} is not a model class{}",
                    model.repr().map(|r| r.to_string()).unwrap_or_default(),
                    sqlalchemy_hint(model)
                ),
            )
        })?;
        self.get_by_pk(py, table, ident)
    }
}

/// The session for one call. A session serves one thread at a time, as SQLAlchemy's
/// does: while one thread's call is inside it (its statements run without the GIL),
/// another thread's call is refused with the same error from every method.
pub fn exclusive<'py>(session: &Bound<'py, PyDbSession>) -> PyResult<PyRefMut<'py, PyDbSession>> {
    session.try_borrow_mut().map_err(|_| in_use())
}

/// The session for a call that only reads it; refused the same way while another
/// thread's call is inside it.
pub fn shared<'py>(session: &Bound<'py, PyDbSession>) -> PyResult<PyRef<'py, PyDbSession>> {
    session.try_borrow().map_err(|_| in_use())
}

fn in_use() -> PyErr {
    raise(
        ErrorKind::InvalidRequest,
        "this session is in use by another thread: a session serves one thread at a time \
         (as SQLAlchemy's does); give each thread its own session (get_db_session())",
    )
}

#[pymethods]
impl PyDbSession {
    /// Tracks a new object (inserted at the next flush) or re-attaches a detached one.
    fn add(slf: &Bound<'_, Self>, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        exclusive(slf)?.add_object(obj)
    }

    fn add_all(slf: &Bound<'_, Self>, objs: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut this = exclusive(slf)?;
        for obj in objs.try_iter()? {
            this.add_object(&obj?)?;
        }
        Ok(())
    }

    /// Marks a persistent object for deletion at the next flush.
    fn delete(slf: &Bound<'_, Self>, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        exclusive(slf)?.delete_object(obj)
    }

    /// Writes pending changes inside the session's transaction, without committing.
    fn flush(slf: &Bound<'_, Self>) -> PyResult<()> {
        exclusive(slf)?.do_flush(slf.py(), FlushScope::ALL)
    }

    /// Writes the new and changed objects of `tables` only, and the deletions if `deletes`:
    /// the SQLAlchemy bridge's flush writes the five tables in steps between the
    /// application's rows they reference and the ones referencing them.
    fn _flush_tables(slf: &Bound<'_, Self>, tables: Vec<String>, deletes: bool) -> PyResult<()> {
        let mut scope = FlushScope { tables: 0, deletes };
        for name in &tables {
            let id = table_by_name(name).ok_or_else(|| {
                PyValueError::new_err(format!("{name:?} is not one of the five tables"))
            })?;
            scope.tables |= 1 << id.index();
        }
        exclusive(slf)?.do_flush(slf.py(), scope)
    }

    fn commit(slf: &Bound<'_, Self>) -> PyResult<()> {
        exclusive(slf)?.do_commit(slf.py())
    }

    /// Undoes the open transaction: new objects are dropped from the session, deleted
    /// ones come back, changed ones are read again.
    fn rollback(slf: &Bound<'_, Self>) -> PyResult<()> {
        exclusive(slf)?.do_rollback(slf.py())
    }

    /// Rolls back what was not committed and stops tracking every object.
    fn close(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let mut this = exclusive(slf)?;
        let result = this.do_rollback(py);
        this.do_expunge_all(py)?;
        result
    }

    fn expunge(slf: &Bound<'_, Self>, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        exclusive(slf)?.expunge_object(obj)
    }

    fn expunge_all(slf: &Bound<'_, Self>) -> PyResult<()> {
        exclusive(slf)?.do_expunge_all(slf.py())
    }

    /// Reads the object's row again, discarding unsaved changes.
    fn refresh(slf: &Bound<'_, Self>, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        exclusive(slf)?.refresh_object(obj)
    }

    /// `db.query(Model)` or `db.query(Model.column, ...)`.
    #[pyo3(signature = (*entities))]
    fn query(slf: &Bound<'_, Self>, entities: &Bound<'_, PyTuple>) -> PyResult<PyQuery> {
        PyQuery::new(slf.clone().unbind(), entities)
    }

    /// The object of `model` with primary key `ident`, or None.
    fn get(
        slf: &Bound<'_, Self>,
        model: &Bound<'_, PyAny>,
        ident: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Py<PyAny>>> {
        exclusive(slf)?.get_object(slf.py(), model, ident)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        slf: &Bound<'_, Self>,
        _exc_type: &Bound<'_, PyAny>,
        _exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        Self::close(slf)?;
        Ok(false)
    }

    /// Objects added and not yet flushed.
    #[getter(new)]
    fn new_objects<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyList>> {
        let py = slf.py();
        PyList::new(py, shared(slf)?.pending.iter().map(|o| o.clone_ref(py)))
    }

    /// Tracked objects with assignments not yet flushed.
    #[getter]
    fn dirty<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyList>> {
        let py = slf.py();
        let this = shared(slf)?;
        let mut out = Vec::new();
        for obj in this.identity.values() {
            if obj.bind(py).cast::<PyModel>()?.borrow().dirty != 0 {
                out.push(obj.clone_ref(py));
            }
        }
        PyList::new(py, out)
    }

    /// Objects marked for deletion and not yet flushed.
    #[getter]
    fn deleted<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyList>> {
        let py = slf.py();
        PyList::new(py, shared(slf)?.to_delete.iter().map(|o| o.clone_ref(py)))
    }

    /// False after a failed flush, until rollback().
    #[getter]
    fn is_active(slf: &Bound<'_, Self>) -> PyResult<bool> {
        Ok(shared(slf)?.failed.is_none())
    }

    /// The DB-API connection this session runs on from now on: the one its open
    /// transaction holds (the transaction goes on), else one checked out of its engine's
    /// pool. `cmbagent_db.sqlalchemy` hands it to SQLAlchemy, so both share one
    /// connection; closing the DB-API connection gives it back to the pool.
    fn _lend_connection(slf: &Bound<'_, Self>) -> PyResult<Py<PyDbapiConnection>> {
        let py = slf.py();
        let mut this = exclusive(slf)?;
        this.check_usable()?;
        if let Some(lender) = &this.lender {
            return Ok(lender.clone_ref(py));
        }
        let engine = this.engine.clone();
        // Without a lender the slot holds a pooled connection or none.
        let pooled = match this.slot().take() {
            Some(Held::Pooled(p)) => p,
            _ => py.detach(|| engine.connect())?,
        };
        let lent = Py::new(py, PyDbapiConnection::lend(&engine, pooled))?;
        this.lender = Some(lent.clone_ref(py));
        Ok(lent)
    }

    /// Runs this session on `conn` from now on, or on its engine's pool with None (what
    /// `cmbagent_db.sqlalchemy` does when SQLAlchemy's pool is to hold the connection, or
    /// after the connection it shared was lost). Only between transactions: the objects
    /// the session tracks stay as they are.
    #[pyo3(signature = (conn))]
    fn _switch_connection(
        slf: &Bound<'_, Self>,
        conn: Option<Py<PyDbapiConnection>>,
    ) -> PyResult<()> {
        let mut this = exclusive(slf)?;
        let slot = this.slot();
        if slot.as_mut().is_some_and(Held::in_transaction) {
            return Err(raise(
                ErrorKind::InvalidRequest,
                "the session's connection cannot change inside a transaction: commit or roll back first",
            ));
        }
        *slot = None;
        this.lender = conn;
        Ok(())
    }

    fn in_transaction(slf: &Bound<'_, Self>) -> PyResult<bool> {
        Ok(exclusive(slf)?
            .slot()
            .as_mut()
            .is_some_and(Held::in_transaction))
    }

    fn __contains__(slf: &Bound<'_, Self>, obj: &Bound<'_, PyAny>) -> PyResult<bool> {
        let b = model(obj)?;
        let m = b.borrow();
        let this = shared(slf)?;
        Ok(this.owns(&m) && matches!(m.state, ObjState::Pending | ObjState::Persistent))
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let this = shared(slf)?;
        Ok(format!(
            "<DbSession {} tracking {} objects>",
            this.engine.display_url(),
            this.identity.len() + this.pending.len()
        ))
    }
}

impl Drop for PyDbSession {
    fn drop(&mut self) {
        // Objects outlive their session: let them be added to another one.
        Python::attach(|py| {
            for obj in self.identity.values().chain(&self.pending) {
                if let Ok(b) = obj.bind(py).cast::<PyModel>() {
                    if let Ok(mut m) = b.try_borrow_mut() {
                        if self.owns(&m) {
                            m.session = None;
                            if m.state == ObjState::Persistent {
                                m.state = ObjState::Detached;
                            } else if m.state == ObjState::Pending {
                                m.state = ObjState::Transient;
                            }
                        }
                    }
                }
            }
        });
    }
}
