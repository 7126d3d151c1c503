//! `Query`: what `db.query(...)` returns. Each builder method returns a new query; the
//! terminal methods run it through the session.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::error::ErrorKind;
use crate::expr::{CmpOp, ColRef, Expr, Source};
use crate::python::convert::{to_value, Purpose};
use crate::python::errors::raise;
use crate::python::expression::{criterion, PyAggregate, PyAliased, PyColumn, PyOrdering};
use crate::python::model::{sqlalchemy_hint, table_of_class};
use crate::python::relationship::{preload, PyLoadOption, PyRelationship};
use crate::python::session::{column_of, exclusive, shared, PyDbSession};
use crate::query::{entity_items, Item, Join, Output, Select};
use crate::schema::{Relationship, Table, TableId, TABLES};

#[pyclass(module = "cmbagent_db", name = "Query")]
pub struct PyQuery {
    session: Py<PyDbSession>,
    select: Select,
    /// What each row returned holds: model objects and values, from the selected items.
    outputs: Vec<Output>,
    /// Whether rows overwrite objects the session already tracks (`populate_existing()`).
    overwrite: bool,
    /// Relationships loaded for every object returned: (table, relationship index).
    eager: Vec<(TableId, usize)>,
}

/// What `query()` takes: a model class, `aliased(Model)`, a column or an aggregate.
fn entity_source(e: &Bound<'_, PyAny>) -> Option<Source> {
    if let Some(table) = table_of_class(e) {
        return Some(Source::of(table));
    }
    e.cast::<PyAliased>().ok().map(|a| a.get().source)
}

/// A join target: a model class, `aliased(Model)`, or a relationship (`WorkflowRun.approval_requests`).
fn join_target(e: &Bound<'_, PyAny>) -> PyResult<(Source, Option<&'static Relationship>)> {
    if let Some(s) = entity_source(e) {
        return Ok((s, None));
    }
    if let Ok(r) = e.cast::<PyRelationship>() {
        let rel = r.get().rel();
        return Ok((Source::of(rel.target()), Some(rel)));
    }
    Err(PyTypeError::new_err(format!(
        "join() takes a model class, aliased(Model) or a relationship, got {}",
        e.repr().map(|r| r.to_string()).unwrap_or_default()
    )))
}

impl PyQuery {
    pub fn new(session: Py<PyDbSession>, entities: &Bound<'_, PyTuple>) -> PyResult<PyQuery> {
        let mut select = Select::default();
        let mut outputs = Vec::with_capacity(entities.len());
        let mut from = None;
        for e in entities.iter() {
            if let Some(source) = entity_source(&e) {
                from.get_or_insert(source);
                outputs.push(Output::Entity {
                    table: source.table,
                    start: select.items.len(),
                });
                select.items.extend(entity_items(source));
                continue;
            }
            let item = if let Ok(c) = e.cast::<PyColumn>() {
                Item::Column(c.get().col)
            } else if let Ok(a) = e.cast::<PyAggregate>() {
                a.get().item
            } else {
                return Err(PyTypeError::new_err(format!(
                    "query() takes model classes, aliased(...) models, columns and func \
                     aggregates, got {}{}",
                    e.repr().map(|r| r.to_string()).unwrap_or_default(),
                    sqlalchemy_hint(&e)
                )));
            };
            if let Some(c) = item.column() {
                from.get_or_insert(c.source());
            }
            outputs.push(Output::Value(select.items.len()));
            select.items.push(item);
        }
        select.from = from.ok_or_else(|| {
            PyTypeError::new_err("query() needs a model class or a column to read from")
        })?;
        Ok(PyQuery {
            session,
            select,
            outputs,
            overwrite: false,
            eager: Vec::new(),
        })
    }

    fn with(&self, py: Python<'_>, select: Select) -> PyQuery {
        PyQuery {
            session: self.session.clone_ref(py),
            select,
            outputs: self.outputs.clone(),
            overwrite: self.overwrite,
            eager: self.eager.clone(),
        }
    }

    /// The model, when the query returns objects of one model rather than tuples.
    fn single_entity(&self) -> Option<TableId> {
        match self.outputs[..] {
            [Output::Entity { table, start: 0 }] => Some(table),
            _ => None,
        }
    }

    /// Where name-based arguments (`filter_by`, `order_by("name")`) look a column up:
    /// the last model joined, else the first one queried, as in SQLAlchemy.
    fn current_source(&self) -> Source {
        self.select
            .joins
            .last()
            .map_or(self.select.from, |j| j.target)
    }

    fn run(&self, py: Python<'_>, select: &Select) -> PyResult<Vec<Py<PyAny>>> {
        // Joins were checked when added (`join_to`); nothing else changes them.
        let session = self.session.bind(py);
        let objs = if self.single_entity().is_some() && select.reads_one_table() {
            exclusive(session)?.fetch(py, select, self.overwrite)?
        } else {
            exclusive(session)?.fetch_rows(py, select, &self.outputs, self.overwrite)?
        };
        for &(table, index) in &self.eager {
            preload(py, session, &objs, table, index, self.overwrite)?;
        }
        Ok(objs)
    }

    fn limited(&self, n: u64) -> Select {
        let mut s = self.select.clone();
        s.limit = Some(s.limit.map_or(n, |l| l.min(n)));
        s
    }

    fn join_to(
        &self,
        py: Python<'_>,
        target: &Bound<'_, PyAny>,
        on: Option<&Bound<'_, PyAny>>,
        outer: bool,
    ) -> PyResult<PyQuery> {
        let (target, rel) = join_target(target)?;
        let mut select = self.select.clone();
        let join = match (on, rel) {
            (Some(on), _) => Join {
                target,
                on: criterion(on, "join()")?,
                outer,
            },
            (None, Some(rel)) => {
                let fk = ColRef::new(rel.child, rel.column_index());
                let pk = ColRef::new(rel.parent(), Table::PK);
                Join {
                    target,
                    on: Expr::CompareColumns(pk, CmpOp::Eq, fk),
                    outer,
                }
            }
            (None, None) => Join::along_foreign_key(&select.joined(), target, outer)
                .map_err(|m| raise(ErrorKind::InvalidRequest, m))?,
        };
        select.joins.push(join);
        select
            .check()
            .map_err(|m| raise(ErrorKind::InvalidRequest, m))?;
        Ok(self.with(py, select))
    }
}

fn non_negative(v: Option<i64>, what: &str) -> PyResult<Option<u64>> {
    match v {
        None => Ok(None),
        Some(n) if n >= 0 => Ok(Some(n as u64)),
        Some(n) => Err(PyValueError::new_err(format!(
            "{what}() takes a non-negative number, got {n}"
        ))),
    }
}

#[pymethods]
impl PyQuery {
    /// Adds criteria, all of which must hold.
    #[pyo3(signature = (*criteria))]
    fn filter(&self, py: Python<'_>, criteria: &Bound<'_, PyTuple>) -> PyResult<PyQuery> {
        let mut select = self.select.clone();
        for c in criteria.iter() {
            select.filters.push(criterion(&c, "filter()")?);
        }
        Ok(self.with(py, select))
    }

    /// Adds `column == value` criteria by column name.
    #[pyo3(signature = (**kwargs))]
    fn filter_by(&self, py: Python<'_>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<PyQuery> {
        let mut select = self.select.clone();
        let source = self.current_source();
        for (k, v) in kwargs.into_iter().flat_map(|d| d.iter()) {
            let name = k.cast::<PyString>()?.to_str()?.to_owned();
            let col = ColRef {
                alias: source.alias,
                ..ColRef::new(source.table, column_of(source.table, &name)?)
            };
            select.filters.push(if v.is_none() {
                Expr::IsNull(col, false)
            } else {
                Expr::Compare(
                    col,
                    crate::expr::CmpOp::Eq,
                    to_value(col, &v, Purpose::Compare)?,
                )
            });
        }
        Ok(self.with(py, select))
    }

    /// Sorts by columns (`Model.col`, `Model.col.desc()` or a column name); `None` clears.
    #[pyo3(signature = (*clauses))]
    fn order_by(&self, py: Python<'_>, clauses: &Bound<'_, PyTuple>) -> PyResult<PyQuery> {
        let mut select = self.select.clone();
        let from = select.from;
        for c in clauses.iter() {
            if c.is_none() {
                select.order_by.clear();
                continue;
            }
            let ordering = if let Ok(o) = c.cast::<PyOrdering>() {
                (o.get().item, o.get().descending)
            } else if let Ok(col) = c.cast::<PyColumn>() {
                (Item::Column(col.get().col), false)
            } else if let Ok(a) = c.cast::<PyAggregate>() {
                (a.get().item, false)
            } else if let Ok(name) = c.cast::<PyString>() {
                let column = column_of(from.table, name.to_str()?)?;
                (
                    Item::Column(ColRef {
                        alias: from.alias,
                        ..ColRef::new(from.table, column)
                    }),
                    false,
                )
            } else {
                return Err(PyTypeError::new_err(format!(
                    "order_by() takes columns such as ApprovalRequest.created_at.desc(), got {}",
                    c.repr()?
                )));
            };
            select.order_by.push(ordering);
        }
        Ok(self.with(py, select))
    }

    /// Inner join: `join(SessionState, Session.id == SessionState.session_id)`, or
    /// `join(SessionState)` / `join(Session.session_states)` along the foreign key.
    #[pyo3(signature = (target, on = None))]
    fn join(
        &self,
        py: Python<'_>,
        target: &Bound<'_, PyAny>,
        on: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyQuery> {
        self.join_to(py, target, on, false)
    }

    /// `LEFT OUTER JOIN`: rows without a match keep None for the joined model's values.
    #[pyo3(signature = (target, on = None))]
    fn outerjoin(
        &self,
        py: Python<'_>,
        target: &Bound<'_, PyAny>,
        on: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyQuery> {
        self.join_to(py, target, on, true)
    }

    /// `GROUP BY` these columns (with aggregates such as `func.count(...)` selected).
    #[pyo3(signature = (*columns))]
    fn group_by(&self, py: Python<'_>, columns: &Bound<'_, PyTuple>) -> PyResult<PyQuery> {
        let mut select = self.select.clone();
        for c in columns.iter() {
            let col = c.cast::<PyColumn>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "group_by() takes columns such as WorkflowRun.status, got {}",
                    c.repr().map(|r| r.to_string()).unwrap_or_default()
                ))
            })?;
            select.group_by.push(col.get().col);
        }
        Ok(self.with(py, select))
    }

    /// `SELECT DISTINCT`.
    fn distinct(&self, py: Python<'_>) -> PyQuery {
        let mut select = self.select.clone();
        select.distinct = true;
        self.with(py, select)
    }

    #[pyo3(signature = (limit))]
    fn limit(&self, py: Python<'_>, limit: Option<i64>) -> PyResult<PyQuery> {
        let mut select = self.select.clone();
        select.limit = non_negative(limit, "limit")?;
        Ok(self.with(py, select))
    }

    #[pyo3(signature = (offset))]
    fn offset(&self, py: Python<'_>, offset: Option<i64>) -> PyResult<PyQuery> {
        let mut select = self.select.clone();
        select.offset = non_negative(offset, "offset")?;
        Ok(self.with(py, select))
    }

    /// Rows read by this query overwrite the objects the session already tracks (those
    /// without unsaved changes), instead of the identity map returning them as they were.
    fn populate_existing(&self, py: Python<'_>) -> PyQuery {
        let mut q = self.with(py, self.select.clone());
        q.overwrite = true;
        q
    }

    /// Loader options: `selectinload(WorkflowRun.approval_requests)`, ...
    #[pyo3(signature = (*options))]
    fn options(&self, py: Python<'_>, options: &Bound<'_, PyTuple>) -> PyResult<PyQuery> {
        let mut q = self.with(py, self.select.clone());
        for o in options.iter() {
            let o = o.cast::<PyLoadOption>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "options() takes selectinload(...) / joinedload(...), got {}",
                    o.repr().map(|r| r.to_string()).unwrap_or_default()
                ))
            })?;
            let (table, index) = (o.get().table, o.get().index);
            if self.single_entity() != Some(table) {
                return Err(raise(
                    ErrorKind::InvalidRequest,
                    format!(
                        "{}.{} is not a relationship of what this query returns",
                        TABLES[table].model, TABLES[table].relationships[index].name
                    ),
                ));
            }
            q.eager.push((table, index));
        }
        Ok(q)
    }

    fn all<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.run(py, &self.select)?)
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(self.all(py)?.try_iter()?.into_any())
    }

    /// The first row, or None.
    fn first(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        Ok(self.run(py, &self.limited(1))?.into_iter().next())
    }

    /// Exactly one row, else NoResultFound / MultipleResultsFound.
    fn one(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.one_or_none(py)?.ok_or_else(|| {
            raise(
                ErrorKind::NoResultFound,
                format!(
                    "no {} row matched the query",
                    TABLES[self.select.from.table].name
                ),
            )
        })
    }

    /// One row or None; MultipleResultsFound for more.
    fn one_or_none(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let mut rows = self.run(py, &self.limited(2))?;
        if rows.len() > 1 {
            return Err(raise(
                ErrorKind::MultipleResultsFound,
                format!(
                    "several {} rows matched a query that expected one",
                    TABLES[self.select.from.table].name
                ),
            ));
        }
        Ok(rows.pop())
    }

    /// The first column of the first row, or None.
    fn scalar(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match self.first(py)? {
            Some(row) if self.single_entity().is_none() => {
                Ok(Some(row.bind(py).get_item(0)?.unbind()))
            }
            other => Ok(other),
        }
    }

    fn count(&self, py: Python<'_>) -> PyResult<i64> {
        exclusive(self.session.bind(py))?.count(py, &self.select)
    }

    /// The object with this primary key, or None (legacy `query(M).get(pk)`).
    fn get(&self, py: Python<'_>, ident: &Bound<'_, PyAny>) -> PyResult<Option<Py<PyAny>>> {
        exclusive(self.session.bind(py))?.get_by_pk(py, self.select.from.table, ident)
    }

    /// Sets columns on every matching row in one UPDATE; returns the number matched.
    /// Runs in the session's transaction: commit() makes it permanent.
    #[pyo3(signature = (values, synchronize_session = None))]
    fn update(
        &self,
        py: Python<'_>,
        values: &Bound<'_, PyDict>,
        synchronize_session: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        let _ = synchronize_session;
        self.guard_bulk("update")?;
        exclusive(self.session.bind(py))?.bulk_update(
            py,
            self.select.from.table,
            &self.select.filters,
            values,
        )
    }

    /// Deletes every matching row in one DELETE; returns the number deleted.
    /// Runs in the session's transaction: commit() makes it permanent.
    #[pyo3(signature = (synchronize_session = None))]
    fn delete(
        &self,
        py: Python<'_>,
        synchronize_session: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        let _ = synchronize_session;
        self.guard_bulk("delete")?;
        exclusive(self.session.bind(py))?.bulk_delete(
            py,
            self.select.from.table,
            &self.select.filters,
        )
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let d = shared(self.session.bind(py))?.dialect();
        Ok(format!("<Query {}>", self.select.render(d).0))
    }
}

impl PyQuery {
    fn guard_bulk(&self, what: &str) -> PyResult<()> {
        // An UPDATE / DELETE names one table: criteria on another model (a join, or one
        // through filter()) have no place in it.
        if self.single_entity().is_none()
            || !self.select.reads_one_table()
            || !self.select.group_by.is_empty()
            || self.select.distinct
        {
            return Err(raise(
                ErrorKind::InvalidRequest,
                format!(
                    "{what}() works on a query of one model without joins, group_by() or \
                     distinct(); filter that model's rows instead"
                ),
            ));
        }
        if self.select.limit.is_some()
            || self.select.offset.is_some()
            || !self.select.order_by.is_empty()
        {
            return Err(raise(
                ErrorKind::InvalidRequest,
                format!("{what}() cannot follow limit(), offset() or order_by(); filter the rows instead"),
            ));
        }
        Ok(())
    }
}
