//! What `Model.column` is at class level: a descriptor that reads and writes the attribute
//! on instances, and builds filter expressions and orderings on the class.

use pyo3::basic::CompareOp;
use pyo3::exceptions::{PyAttributeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::dialect::Dialect;
use crate::error::ErrorKind;
use crate::python::errors::raise;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::expr::{CmpOp, ColRef, Expr, Params, Source};
use crate::python::convert::{normalise, to_py, to_value, Purpose};
use crate::python::model::table_of_class;
use crate::python::model::{PyModel, Slot};
use crate::query::{Aggregate, Item};
use crate::schema::{ColType, TABLES};

/// A mapped column: `ApprovalRequest.status`.
#[pyclass(module = "cmbagent_db", name = "Column", frozen)]
pub struct PyColumn {
    pub col: ColRef,
}

/// A filter criterion: `ApprovalRequest.status == "pending"`, `and_(...)`, ...
#[pyclass(module = "cmbagent_db", name = "Expression", frozen)]
pub struct PyExpression {
    pub expr: Expr,
}

/// A column or aggregate with a sort direction: `ApprovalRequest.created_at.desc()`.
#[pyclass(module = "cmbagent_db", name = "Ordering", frozen)]
pub struct PyOrdering {
    pub item: Item,
    pub descending: bool,
}

/// An aggregate to select or sort by: `func.count(WorkflowRun.id)`, `func.max(...)`.
#[pyclass(module = "cmbagent_db", name = "Aggregate", frozen)]
pub struct PyAggregate {
    pub item: Item,
}

/// `func`: the aggregates queries can select (`func.count`, `func.max`, `func.min`,
/// `func.sum`).
#[pyclass(module = "cmbagent_db", name = "FunctionNamespace", frozen)]
pub struct PyFunctionNamespace;

/// A model under another name, for joining a table to itself:
/// `parent = aliased(WorkflowRun)`; `parent.id` is that copy's column.
#[pyclass(module = "cmbagent_db", name = "AliasedClass", frozen)]
pub struct PyAliased {
    pub source: Source,
}

/// Numbers aliases so that every `aliased()` call names a distinct copy of its table.
static NEXT_ALIAS: AtomicU32 = AtomicU32::new(1);

fn expression(expr: Expr) -> PyExpression {
    PyExpression { expr }
}

/// The SQLAlchemy column (ascending / descending when `descending` says) for `col`.
fn clause(py: Python<'_>, col: ColRef, descending: Option<bool>) -> PyResult<Py<PyAny>> {
    if col.alias != 0 {
        return Err(raise(
            ErrorKind::NotSupported,
            format!(
                "{} is a column of aliased(); SQLAlchemy constructs take the model's own columns",
                col.qualified()
            ),
        ));
    }
    Ok(py
        .import("cmbagent_db.sqlalchemy")?
        .getattr("_clause")?
        .call1((TABLES[col.table].name, col.name(), descending))?
        .unbind())
}

impl PyColumn {
    fn value(&self, v: &Bound<'_, PyAny>) -> PyResult<crate::value::Value> {
        if v.cast::<PyColumn>().is_ok() {
            return Err(PyTypeError::new_err(format!(
                "{} takes values here, not another column",
                self.col.qualified()
            )));
        }
        to_value(self.col, v, Purpose::Compare)
    }

    fn values(&self, values: &Bound<'_, PyAny>) -> PyResult<Vec<crate::value::Value>> {
        if values.is_instance_of::<pyo3::types::PyString>() {
            return Err(PyTypeError::new_err(format!(
                "{}.in_() takes a list of values, not a str",
                self.col.qualified()
            )));
        }
        values
            .try_iter()
            .map_err(|_| {
                PyTypeError::new_err(format!(
                    "{}.in_() takes a list of values",
                    self.col.qualified()
                ))
            })?
            .map(|v| self.value(&v?))
            .collect()
    }

    fn compare(&self, other: &Bound<'_, PyAny>, op: CompareOp) -> PyResult<PyExpression> {
        if other.is_none() {
            return match op {
                CompareOp::Eq => Ok(expression(Expr::IsNull(self.col, false))),
                CompareOp::Ne => Ok(expression(Expr::IsNull(self.col, true))),
                _ => Err(PyTypeError::new_err(format!(
                    "{} cannot be ordered against None",
                    self.col.qualified()
                ))),
            };
        }
        let op = match op {
            CompareOp::Eq => CmpOp::Eq,
            CompareOp::Ne => CmpOp::Ne,
            CompareOp::Lt => CmpOp::Lt,
            CompareOp::Le => CmpOp::Le,
            CompareOp::Gt => CmpOp::Gt,
            CompareOp::Ge => CmpOp::Ge,
        };
        if let Ok(c) = other.cast::<PyColumn>() {
            return Ok(expression(Expr::CompareColumns(self.col, op, c.get().col)));
        }
        Ok(expression(Expr::Compare(self.col, op, self.value(other)?)))
    }
}

#[pymethods]
impl PyColumn {
    fn __get__(
        slf: &Bound<'_, Self>,
        instance: &Bound<'_, PyAny>,
        _owner: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        if instance.is_none() {
            return Ok(slf.clone().into_any().unbind());
        }
        let mut model = instance.cast::<PyModel>()?.borrow_mut();
        model.get(slf.py(), slf.get().col.column)
    }

    fn __set__(&self, instance: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let stored = normalise(self.col, value)?;
        let mut model = instance.cast::<PyModel>()?.borrow_mut();
        model.values[self.col.column] = Slot::Py(stored);
        model.dirty |= 1 << self.col.column;
        Ok(())
    }

    fn __richcmp__(
        &self,
        py: Python<'_>,
        other: &Bound<'_, PyAny>,
        op: CompareOp,
    ) -> PyResult<Py<PyAny>> {
        match self.compare(other, op) {
            Ok(e) => Ok(e.into_pyobject(py)?.into_any().unbind()),
            // A SQLAlchemy column (`WorkflowRun.id == DAGNode.run_id`) is no value of ours:
            // Python then asks its side, which builds SQLAlchemy's expression through ours.
            // Asked only after the value failed, so plain comparisons pay nothing for it.
            Err(_)
                if other.cast::<PyColumn>().is_err()
                    && other.hasattr(pyo3::intern!(py, "__clause_element__"))? =>
            {
                Ok(py.NotImplemented())
            }
            Err(e) => Err(e),
        }
    }

    /// This column in SQLAlchemy constructs (`select()`, a SQLAlchemy query's `join()` or
    /// `order_by()`): the column of `cmbagent_db.sqlalchemy.Base.metadata`'s table.
    fn __clause_element__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        clause(py, self.col, None)
    }

    fn __hash__(&self) -> u64 {
        (self.col.alias as u64) << 40
            | (self.col.table.index() as u64) << 32
            | self.col.column as u64
    }

    fn __repr__(&self) -> String {
        format!("{}.{}", self.col.source().describe(), self.col.name())
    }

    /// The column's name.
    #[getter]
    fn key(&self) -> &'static str {
        self.col.name()
    }

    #[getter]
    fn name(&self) -> &'static str {
        self.col.name()
    }

    fn asc(&self) -> PyOrdering {
        PyOrdering {
            item: Item::Column(self.col),
            descending: false,
        }
    }

    fn desc(&self) -> PyOrdering {
        PyOrdering {
            item: Item::Column(self.col),
            descending: true,
        }
    }

    /// `IS NULL` for None; equality for True / False.
    fn is_(&self, other: &Bound<'_, PyAny>) -> PyResult<PyExpression> {
        self.compare(other, CompareOp::Eq)
    }

    fn is_not(&self, other: &Bound<'_, PyAny>) -> PyResult<PyExpression> {
        self.compare(other, CompareOp::Ne)
    }

    fn isnot(&self, other: &Bound<'_, PyAny>) -> PyResult<PyExpression> {
        self.compare(other, CompareOp::Ne)
    }

    fn in_(&self, values: &Bound<'_, PyAny>) -> PyResult<PyExpression> {
        Ok(expression(Expr::In(self.col, self.values(values)?, false)))
    }

    fn not_in(&self, values: &Bound<'_, PyAny>) -> PyResult<PyExpression> {
        Ok(expression(Expr::In(self.col, self.values(values)?, true)))
    }

    fn notin_(&self, values: &Bound<'_, PyAny>) -> PyResult<PyExpression> {
        self.not_in(values)
    }

    fn like(&self, pattern: String) -> PyResult<PyExpression> {
        self.text_only("like")?;
        Ok(expression(Expr::Like(self.col, pattern, false)))
    }

    fn ilike(&self, pattern: String) -> PyResult<PyExpression> {
        self.text_only("ilike")?;
        Ok(expression(Expr::Like(self.col, pattern, true)))
    }

    fn between(&self, low: &Bound<'_, PyAny>, high: &Bound<'_, PyAny>) -> PyResult<PyExpression> {
        Ok(expression(Expr::And(vec![
            Expr::Compare(self.col, CmpOp::Ge, self.value(low)?),
            Expr::Compare(self.col, CmpOp::Le, self.value(high)?),
        ])))
    }
}

impl PyColumn {
    fn text_only(&self, what: &str) -> PyResult<()> {
        match TABLES[self.col.table].columns[self.col.column].ty {
            ColType::Str(_) | ColType::Text => Ok(()),
            _ => Err(PyTypeError::new_err(format!(
                "{what}() needs a text column; {} is not one",
                self.col.qualified()
            ))),
        }
    }
}

fn all_criteria(items: &Bound<'_, PyTuple>, what: &str) -> PyResult<Vec<Expr>> {
    items.iter().map(|item| criterion(&item, what)).collect()
}

/// A filter criterion from Python, with a clear error for the usual mistake: a plain
/// bool from comparing something that is not a mapped column.
pub fn criterion(item: &Bound<'_, PyAny>, what: &str) -> PyResult<Expr> {
    match item.cast::<PyExpression>() {
        Ok(e) => Ok(e.get().expr.clone()),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{what} takes column expressions such as ApprovalRequest.status == 'pending'; got {} {}",
            item.get_type().name()?,
            item.repr()?
        ))),
    }
}

/// `expr` as a SQLAlchemy expression over `cmbagent_db.sqlalchemy.Base.metadata`'s tables,
/// with the same operators and bound values.
fn sa_expression(py: Python<'_>, expr: &Expr) -> PyResult<Py<PyAny>> {
    let sa = py.import("sqlalchemy")?;
    let column = |c: ColRef| clause(py, c, None);
    let method = |op: CmpOp| match op {
        CmpOp::Eq => "__eq__",
        CmpOp::Ne => "__ne__",
        CmpOp::Lt => "__lt__",
        CmpOp::Le => "__le__",
        CmpOp::Gt => "__gt__",
        CmpOp::Ge => "__ge__",
    };
    let all = |parts: &[Expr]| -> PyResult<Vec<Py<PyAny>>> {
        parts.iter().map(|e| sa_expression(py, e)).collect()
    };
    Ok(match expr {
        Expr::Compare(c, op, v) => {
            column(*c)?.call_method1(py, method(*op), (to_py(py, v, *c)?,))?
        }
        Expr::CompareColumns(a, op, b) => {
            column(*a)?.call_method1(py, method(*op), (column(*b)?,))?
        }
        Expr::IsNull(c, negated) => {
            column(*c)?.call_method1(py, if *negated { "is_not" } else { "is_" }, (py.None(),))?
        }
        Expr::In(c, values, negated) => {
            let values = values
                .iter()
                .map(|v| to_py(py, v, *c))
                .collect::<PyResult<Vec<_>>>()?;
            column(*c)?.call_method1(py, if *negated { "not_in" } else { "in_" }, (values,))?
        }
        Expr::Like(c, pattern, insensitive) => {
            column(*c)?.call_method1(py, if *insensitive { "ilike" } else { "like" }, (pattern,))?
        }
        Expr::And(parts) => sa
            .call_method1("and_", PyTuple::new(py, all(parts)?)?)?
            .unbind(),
        Expr::Or(parts) => sa
            .call_method1("or_", PyTuple::new(py, all(parts)?)?)?
            .unbind(),
        Expr::Not(inner) => sa
            .call_method1("not_", (sa_expression(py, inner)?,))?
            .unbind(),
    })
}

#[pymethods]
impl PyExpression {
    /// This criterion in SQLAlchemy constructs (a SQLAlchemy query's `filter()`, `join()`
    /// or `where()`): the same comparison over `cmbagent_db.sqlalchemy.Base.metadata`.
    fn __clause_element__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        sa_expression(py, &self.expr)
    }

    fn __and__(&self, other: &Bound<'_, PyAny>) -> PyResult<PyExpression> {
        Ok(expression(Expr::And(vec![
            self.expr.clone(),
            criterion(other, "&")?,
        ])))
    }

    fn __or__(&self, other: &Bound<'_, PyAny>) -> PyResult<PyExpression> {
        Ok(expression(Expr::Or(vec![
            self.expr.clone(),
            criterion(other, "|")?,
        ])))
    }

    fn __invert__(&self) -> PyExpression {
        expression(Expr::Not(Box::new(self.expr.clone())))
    }

    fn __bool__(&self) -> PyResult<bool> {
        Err(PyTypeError::new_err(
            "the truth value of a filter expression is not defined; use and_() / or_() or & / |",
        ))
    }

    /// The SQL this criterion renders to (SQLite placeholders), for debugging.
    fn __repr__(&self) -> String {
        let mut sql = String::new();
        let mut params = Params::new(Dialect::Sqlite);
        self.expr.render(&mut sql, &mut params);
        format!("<Expression {sql} {:?}>", params.values)
    }
}

#[pymethods]
impl PyOrdering {
    /// This ordering in SQLAlchemy constructs (a SQLAlchemy query's `order_by()`).
    fn __clause_element__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match self.item {
            Item::Column(col) => clause(py, col, Some(self.descending)),
            _ => Err(raise(
                ErrorKind::NotSupported,
                "only a column's asc() / desc() can order a SQLAlchemy query; use func from sqlalchemy for aggregates",
            )),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "<Ordering {}{}>",
            self.item.describe(),
            if self.descending { " DESC" } else { "" }
        )
    }
}

#[pymethods]
impl PyAggregate {
    fn asc(&self) -> PyOrdering {
        PyOrdering {
            item: self.item,
            descending: false,
        }
    }

    fn desc(&self) -> PyOrdering {
        PyOrdering {
            item: self.item,
            descending: true,
        }
    }

    fn __repr__(&self) -> String {
        format!("<Aggregate {}>", self.item.describe())
    }
}

fn aggregate(a: Aggregate, column: &Bound<'_, PyAny>) -> PyResult<PyAggregate> {
    let c = column.cast::<PyColumn>().map_err(|_| {
        PyTypeError::new_err(format!(
            "func.{}() takes a mapped column such as WorkflowRun.started_at, got {}",
            a.name(),
            column.repr().map(|r| r.to_string()).unwrap_or_default()
        ))
    })?;
    let col = c.get().col;
    if a == Aggregate::Sum {
        let ty = TABLES[col.table].columns[col.column].ty;
        if !matches!(ty, ColType::Integer | ColType::BigInt) {
            return Err(PyTypeError::new_err(format!(
                "func.sum() needs a numeric column; {} is not one",
                col.qualified()
            )));
        }
    }
    Ok(PyAggregate {
        item: Item::Aggregate(a, Some(col)),
    })
}

#[pymethods]
impl PyFunctionNamespace {
    /// `count(column)` (rows where it is not NULL), or `count(*)` without an argument.
    #[pyo3(signature = (column = None))]
    fn count(&self, column: Option<&Bound<'_, PyAny>>) -> PyResult<PyAggregate> {
        match column {
            None => Ok(PyAggregate {
                item: Item::Aggregate(Aggregate::Count, None),
            }),
            Some(c) => aggregate(Aggregate::Count, c),
        }
    }

    fn max(&self, column: &Bound<'_, PyAny>) -> PyResult<PyAggregate> {
        aggregate(Aggregate::Max, column)
    }

    fn min(&self, column: &Bound<'_, PyAny>) -> PyResult<PyAggregate> {
        aggregate(Aggregate::Min, column)
    }

    fn sum(&self, column: &Bound<'_, PyAny>) -> PyResult<PyAggregate> {
        aggregate(Aggregate::Sum, column)
    }

    fn __getattr__(&self, name: &str) -> PyResult<()> {
        Err(PyAttributeError::new_err(format!(
            "func.{name} is not supported; queries can select func.count, func.max, func.min \
             and func.sum"
        )))
    }
}

/// `aliased(WorkflowRun)`: a second copy of a model's table for self-joins.
#[pyfunction]
pub fn aliased(model: &Bound<'_, PyAny>) -> PyResult<PyAliased> {
    let table = table_of_class(model).ok_or_else(|| {
        PyTypeError::new_err(format!(
            "aliased() takes a model class such as WorkflowRun, got {}",
            model.repr().map(|r| r.to_string()).unwrap_or_default()
        ))
    })?;
    Ok(PyAliased {
        source: Source {
            table,
            alias: NEXT_ALIAS.fetch_add(1, Ordering::Relaxed).max(1),
        },
    })
}

#[pymethods]
impl PyAliased {
    /// The aliased copy's column `name`.
    fn __getattr__(&self, name: &str) -> PyResult<PyColumn> {
        let s = self.source;
        match TABLES[s.table].column_index(name) {
            Some(column) => Ok(PyColumn {
                col: ColRef {
                    alias: s.alias,
                    ..ColRef::new(s.table, column)
                },
            }),
            None => Err(PyAttributeError::new_err(format!(
                "aliased({}) has no column {name:?}",
                TABLES[s.table].model
            ))),
        }
    }

    fn __repr__(&self) -> String {
        self.source.describe()
    }
}

/// Every criterion must hold (SQL `AND`).
#[pyfunction]
#[pyo3(signature = (*criteria))]
pub fn and_(criteria: &Bound<'_, PyTuple>) -> PyResult<PyExpression> {
    Ok(expression(Expr::And(all_criteria(criteria, "and_()")?)))
}

/// At least one criterion must hold (SQL `OR`).
#[pyfunction]
#[pyo3(signature = (*criteria))]
pub fn or_(criteria: &Bound<'_, PyTuple>) -> PyResult<PyExpression> {
    Ok(expression(Expr::Or(all_criteria(criteria, "or_()")?)))
}

/// The criterion must not hold (SQL `NOT`).
#[pyfunction]
pub fn not_(clause: &Bound<'_, PyAny>) -> PyResult<PyExpression> {
    Ok(expression(Expr::Not(Box::new(criterion(
        clause, "not_()",
    )?))))
}
