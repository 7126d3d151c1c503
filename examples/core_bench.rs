//! Micro-benchmark of the pure Rust core, without Python: the bulk insert of 20,000 pending
//! approvals in one transaction and lookups by id, done the way the Python session does them
//! (the same batched multi-row INSERTs, `Conn::insert_rows`; a `Select` with an
//! `id == x` filter and `LIMIT 1`, rendered and run per lookup). Comparing its numbers with
//! the Python API's shows what the Python boundary costs.
//!
//!     cargo run --release --example core_bench -- <sqlite path or URL>
//!         [--lookup-db <path or URL>] [--insert-db <path or URL>]... [--rows N]
//!         [--lookups N] [--reps N] [--run-id ID] [--session-id ID] [--serve insert|lookup]
//!
//! The first argument is a migrated database holding at least one workflow run. With no
//! `--insert-db`, every repetition inserts into it (emptying the table first, outside the
//! timing); each `--insert-db` is a fresh copy used by one repetition instead (the first one
//! by the warm-up). Lookups pick ids at random from `--lookup-db` (default: the first
//! database). Standalone it prints medians and a `RESULT {json}` line; with `--serve` it
//! speaks bench/run.py's worker protocol (READY, then REP / END on stdin), so the driver
//! can interleave its repetitions with the Python systems'.

use std::time::Instant;

use chrono::{Duration, Utc};
use cmbagent_db::engine::engine;
use cmbagent_db::expr::{CmpOp, ColRef, Expr};
use cmbagent_db::migrate::migrate;
use cmbagent_db::query::Select;
use cmbagent_db::schema::{ColType, Table, APPROVAL_REQUESTS, TABLES, WORKFLOW_RUNS};
use cmbagent_db::value::Value;

type AnyResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Args {
    db: String,
    lookup_db: Option<String>,
    insert_dbs: Vec<String>,
    rows: usize,
    lookups: usize,
    reps: usize,
    run_id: Option<String>,
    session_id: Option<String>,
    serve: Option<String>,
}

fn parse_args() -> AnyResult<Args> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        db: String::new(),
        lookup_db: None,
        insert_dbs: Vec::new(),
        rows: 20_000,
        lookups: 20_000,
        reps: 5,
        run_id: None,
        session_id: None,
        serve: None,
    };
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--lookup-db" => a.lookup_db = Some(value()?),
            "--insert-db" => a.insert_dbs.push(value()?),
            "--rows" => a.rows = value()?.parse()?,
            "--lookups" => a.lookups = value()?.parse()?,
            "--reps" => a.reps = value()?.parse()?,
            "--run-id" => a.run_id = Some(value()?),
            "--session-id" => a.session_id = Some(value()?),
            "--serve" => a.serve = Some(value()?),
            s if !s.starts_with("--") && a.db.is_empty() => a.db = s.to_string(),
            s => return Err(format!("unknown argument {s:?}").into()),
        }
    }
    if a.db.is_empty() {
        return Err("usage: core_bench <sqlite path or URL> [options]".into());
    }
    Ok(a)
}

/// A path becomes a SQLite URL; URLs pass through.
fn url_of(s: &str) -> String {
    if s.contains("://") {
        s.to_string()
    } else {
        let abs = std::path::absolute(s).unwrap_or_else(|_| s.into());
        format!("sqlite:///{}", abs.display())
    }
}

fn col(name: &str) -> usize {
    TABLES[APPROVAL_REQUESTS]
        .column_index(name)
        .unwrap_or_else(|| panic!("approval_requests.{name} exists"))
}

fn first_text(rows: &[Vec<Value>]) -> Option<String> {
    match rows.first().and_then(|r| r.first()) {
        Some(Value::Text(s)) => Some(s.clone()),
        _ => None,
    }
}

/// What `ApprovalRequest.create_pending(...)` plus the flush put in a row.
fn pending_row(i: usize, run_id: &str, session_id: &Value) -> Vec<Value> {
    let now = Utc::now();
    let t = &TABLES[APPROVAL_REQUESTS];
    let mut row = vec![Value::Null; t.columns.len()];
    row[Table::PK] = Value::Text(uuid::Uuid::new_v4().to_string());
    row[col("run_id")] = Value::Text(run_id.to_string());
    row[col("session_id")] = session_id.clone();
    row[col("approval_type")] = Value::Text("plan_approval".into());
    row[col("context")] = Value::Json(format!(
        "{{\"plan\": \"Run step {i} of the analysis\", \"step\": {i}, \"options\": [\"approve\", \"reject\", \"modify\"]}}"
    ));
    row[col("status")] = Value::Text("pending".into());
    row[col("created_at")] = Value::Timestamp(now);
    row[col("expires_at")] = Value::Timestamp(now + Duration::seconds(300));
    row
}

/// xorshift64*: reproducible random picks without a dependency.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as usize
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// One bulk insert of `rows` pending approvals into `url`, in one transaction; seconds.
fn insert_rep(url: &str, rows: usize, run_id: &str, session_id: &Value) -> AnyResult<f64> {
    let mut conn = engine(url)?.connect()?;
    migrate(&mut conn, "head", false)?;
    let all: Vec<usize> = (0..TABLES[APPROVAL_REQUESTS].columns.len()).collect();
    let t0 = Instant::now();
    let batch: Vec<Vec<Value>> = (0..rows)
        .map(|i| pending_row(i, run_id, session_id))
        .collect();
    conn.begin_write()?;
    let n = conn.insert_rows(APPROVAL_REQUESTS, &all, batch)?;
    conn.commit()?;
    settle_wal(&mut conn)?;
    let secs = t0.elapsed().as_secs_f64();
    if n as usize != rows {
        return Err(format!("inserted {n} rows, expected {rows}").into());
    }
    Ok(secs)
}

/// Waits until the WAL is fully copied into the database file (by the background
/// checkpoint, or by this call), as bench/workloads.py's `Runner._settled` does for the Python
/// systems: a repetition pays for all the copying its commit caused. Nothing on PostgreSQL.
fn settle_wal(conn: &mut cmbagent_db::pool::Pooled) -> AnyResult<()> {
    if conn.dialect() != cmbagent_db::dialect::Dialect::Sqlite {
        return Ok(());
    }
    let shape = [
        ("busy", ColType::BigInt),
        ("log", ColType::BigInt),
        ("checkpointed", ColType::BigInt),
    ];
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let row = conn.query("PRAGMA wal_checkpoint(PASSIVE)", &[], &shape)?;
        if let Some([Value::Int(0), Value::Int(log), Value::Int(done)]) =
            row.first().map(Vec::as_slice)
        {
            if log == done {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err("the WAL was not checkpointed within 60 s".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Lookups by id on one database, ids picked at random among its approvals.
struct Lookups {
    conn: cmbagent_db::pool::Pooled,
    ids: Vec<String>,
    rng: Rng,
    shape: Vec<(&'static str, ColType)>,
}

impl Lookups {
    fn open(url: &str) -> AnyResult<Lookups> {
        let mut conn = engine(url)?.connect()?;
        let ids: Vec<String> = conn
            .query(
                "SELECT id FROM approval_requests ORDER BY id",
                &[],
                &TABLES[APPROVAL_REQUESTS].shape(&[Table::PK]),
            )?
            .into_iter()
            .filter_map(|r| match r.into_iter().next() {
                Some(Value::Text(s)) => Some(s),
                _ => None,
            })
            .collect();
        if ids.is_empty() {
            return Err("the lookup database holds no approval".into());
        }
        let all: Vec<usize> = (0..TABLES[APPROVAL_REQUESTS].columns.len()).collect();
        Ok(Lookups {
            conn,
            ids,
            rng: Rng(0x9E37_79B9_7F4A_7C15),
            shape: TABLES[APPROVAL_REQUESTS].shape(&all),
        })
    }

    /// `n` lookups as the session does them: a `Select` built, rendered and run per id.
    fn rep(&mut self, n: usize) -> AnyResult<f64> {
        let picks: Vec<String> = (0..n)
            .map(|_| self.ids[self.rng.below(self.ids.len())].clone())
            .collect();
        let dialect = self.conn.dialect();
        let id_col = ColRef::new(APPROVAL_REQUESTS, Table::PK);
        let t0 = Instant::now();
        let mut found = 0usize;
        for id in picks {
            let mut select = Select::all_columns(APPROVAL_REQUESTS);
            select
                .filters
                .push(Expr::Compare(id_col, CmpOp::Eq, Value::Text(id)));
            select.limit = Some(1);
            let (sql, params) = select.render(dialect);
            found += self.conn.query(&sql, &params, &self.shape)?.len();
        }
        let secs = t0.elapsed().as_secs_f64();
        if found != n {
            return Err(format!("{found} of {n} lookups found their row").into());
        }
        Ok(secs)
    }
}

fn run_id_of(url: &str) -> AnyResult<String> {
    let mut conn = engine(url)?.connect()?;
    migrate(&mut conn, "head", false)?;
    Ok(first_text(&conn.query(
        "SELECT id FROM workflow_runs ORDER BY id LIMIT 1",
        &[],
        &TABLES[WORKFLOW_RUNS].shape(&[Table::PK]),
    )?)
    .ok_or("the database holds no workflow run to attach approvals to")?)
}

/// bench/run.py's worker protocol: READY once warmed up, then `REP` -> `REP <secs>`,
/// `END` -> `RESULT {}`; on failure `ERROR "<message>"`.
fn serve(args: &Args, what: &str, run_id: &str, session_id: &Value) -> AnyResult<()> {
    use std::io::{BufRead, Write};
    let mut out = std::io::stdout();
    let main_url = url_of(&args.db);
    let mut reps = 0usize;
    let mut lookups = None;
    match what {
        "insert" => {
            let first = args
                .insert_dbs
                .first()
                .ok_or("--serve insert needs --insert-db")?;
            insert_rep(&url_of(first), args.rows, run_id, session_id)?;
        }
        "lookup" => {
            let url = args.lookup_db.as_deref().map(url_of).unwrap_or(main_url);
            let mut l = Lookups::open(&url)?;
            l.rep(200)?;
            lookups = Some(l);
        }
        other => return Err(format!("--serve {other:?}: use insert or lookup").into()),
    }
    writeln!(out, "READY")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        match line?.trim() {
            "REP" => {
                let secs = match &mut lookups {
                    Some(l) => l.rep(args.lookups)?,
                    None => {
                        let db = args
                            .insert_dbs
                            .get(reps + 1)
                            .ok_or("more repetitions than --insert-db copies")?;
                        insert_rep(&url_of(db), args.rows, run_id, session_id)?
                    }
                };
                reps += 1;
                writeln!(out, "REP {secs}")?;
            }
            "END" => {
                writeln!(out, "RESULT {{\"reps\": {reps}}}")?;
                return Ok(());
            }
            other => return Err(format!("unknown command {other:?}").into()),
        }
        out.flush()?;
    }
    Ok(())
}

fn main() {
    let serving = std::env::args().any(|a| a == "--serve");
    if let Err(e) = run() {
        if serving {
            println!("ERROR {:?}", e.to_string());
        } else {
            eprintln!("core_bench: {e}");
        }
        std::process::exit(1);
    }
}

fn run() -> AnyResult<()> {
    let args = parse_args()?;
    let main_url = url_of(&args.db);
    let run_id = match &args.run_id {
        Some(id) => id.clone(),
        None => run_id_of(&main_url)?,
    };
    let session_id = args
        .session_id
        .clone()
        .map(Value::Text)
        .unwrap_or(Value::Null);
    if let Some(what) = &args.serve {
        return serve(&args, what, &run_id, &session_id);
    }

    // Standalone: a warm-up and `reps` timed repetitions of each, medians printed.
    let mut insert_secs = Vec::new();
    for rep in 0..args.reps + 1 {
        let url = match args.insert_dbs.get(rep) {
            Some(db) => url_of(db),
            None => {
                // Reusing the one database: empty it first, outside the timing.
                let mut conn = engine(&main_url)?.connect()?;
                conn.begin_write()?;
                conn.execute("DELETE FROM approval_requests", &[])?;
                conn.commit()?;
                main_url.clone()
            }
        };
        let secs = insert_rep(&url, args.rows, &run_id, &session_id)?;
        if rep > 0 {
            insert_secs.push(secs);
        }
    }
    let insert_rate = args.rows as f64 / median(insert_secs.clone());

    let lookup_url = args.lookup_db.as_deref().map(url_of).unwrap_or(main_url);
    let mut lookups = Lookups::open(&lookup_url)?;
    lookups.rep(200)?;
    let mut lookup_secs = Vec::new();
    for _ in 0..args.reps {
        lookup_secs.push(lookups.rep(args.lookups)?);
    }
    let lookup_rate = args.lookups as f64 / median(lookup_secs.clone());
    let dialect = lookups.conn.dialect();

    println!(
        "Rust core, {}: bulk insert {} rows: {:.0} rows/s (median of {}); lookup by id: {:.0} lookups/s (median of {})",
        dialect.name(),
        args.rows,
        insert_rate,
        insert_secs.len(),
        lookup_rate,
        lookup_secs.len()
    );
    let list = |xs: &[f64]| {
        xs.iter()
            .map(|x| format!("{x:.6}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "RESULT {{\"backend\": \"{}\", \"rows\": {}, \"lookups\": {}, \"bulk_insert_rows_per_s\": {:.1}, \"lookups_per_s\": {:.1}, \"bulk_insert_secs\": [{}], \"lookup_secs\": [{}]}}",
        dialect.name(),
        args.rows,
        args.lookups,
        insert_rate,
        lookup_rate,
        list(&insert_secs),
        list(&lookup_secs)
    );
    Ok(())
}
