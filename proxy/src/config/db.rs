//! The backend table in a database: SQLite (a file next to the settings, the
//! default) or PostgreSQL (one database shared by a fleet of proxies).
//!
//! Connecting, the embedded migrations (one set per database kind), the reads
//! of the live sync ([`Db::version`] is the cheap "anything changed?" check,
//! [`Db::rows`] the full read) and the edits of `sttproxy backends`.
//!
//! Runtime queries only, no compile-time checked macros: a fresh clone builds
//! without a database. The migrations are the files of
//! `proxy/migrations/<kind>`, embedded at build time by `sqlx::migrate!` (a
//! new `0002_*.sql` there is applied by the next start of a proxy or of
//! `sttproxy backends`). The same SQL text serves both kinds where it can
//! (SQLite accepts PostgreSQL's `$1` placeholders); [`on_pool!`] runs one body
//! against whichever pool this is.

use std::error::Error as StdError;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::Row;
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use crate::backend::{BackendSpec, Reuse};

/// The PostgreSQL channel the table's trigger notifies on every change.
pub const NOTIFY_CHANNEL: &str = "sttproxy_backends";

/// How long a query waits for a connection (and so for an unreachable database).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The migrations of each kind: every file of `proxy/migrations/<kind>`,
/// embedded at build time (`build.rs` rebuilds when a file is added).
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// Which database holds the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

impl DbKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DbKind::Sqlite => "sqlite",
            DbKind::Postgres => "postgres",
        }
    }
}

impl fmt::Display for DbKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong with the database.
///
/// Each variant prints its cause in its own message (logs show `%error`, one
/// line) and does not return it as `source()`: a printer of the whole chain
/// (the CLI's `{:#}`) would otherwise repeat it. The cause's own chain is
/// folded in once by [`full_message`].
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "unsupported database URL {0:?}: expected sqlite://PATH, sqlite::memory: or postgres://USER@HOST/DATABASE"
    )]
    UnsupportedUrl(String),
    #[error("database URL {url}: {}", full_message(.error))]
    BadUrl { url: String, error: sqlx::Error },
    #[error("database {url}: {}", full_message(.error))]
    Query { url: String, error: sqlx::Error },
    #[error("connecting to database {url}: {}", full_message(.error))]
    Connect { url: String, error: sqlx::Error },
    #[error("migrating database {url}: {}", full_message(.error))]
    Migrate { url: String, error: MigrateError },
    #[error("migrating database {url}: {error}")]
    MigrationLock { url: String, error: std::io::Error },
    #[error("the database did not answer within {0:?}")]
    Timeout(Duration),
    #[error("no backend with id {0:?}")]
    NotFound(String),
    #[error("a backend with id {0:?} already exists")]
    Duplicate(String),
    #[error("backend {id:?}: {reason}")]
    Invalid { id: String, reason: String },
    #[error(
        "the backend table in {db} already holds other backends ({table}) than --backend \
         names ({flags}): --backend only seeds an empty table on its first start. Change the \
         table with `sttproxy backends` (add, set, remove), or give --db a new file"
    )]
    SeedConflict {
        db: String,
        table: String,
        flags: String,
    },
}

/// `error` and its chain of causes on one line, each cause once: a cause whose
/// text its parent already printed (sqlx and std errors often both print and
/// chain theirs) is left out.
pub fn full_message(error: &(dyn StdError + 'static)) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// A database URL, checked for its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbUrl {
    /// `sqlite://PATH`, `sqlite:PATH`, `sqlite::memory:`.
    Sqlite { url: String, memory: bool },
    /// `postgres://…` or `postgresql://…`.
    Postgres(String),
}

impl DbUrl {
    pub fn parse(url: &str) -> Result<Self, DbError> {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DbUrl::Postgres(url.to_string()))
        } else if let Some(rest) = url.strip_prefix("sqlite:") {
            let rest = rest.trim_start_matches("//");
            let memory = rest.starts_with(":memory:") || rest.contains("mode=memory");
            if rest.is_empty() {
                return Err(DbError::UnsupportedUrl(url.to_string()));
            }
            Ok(DbUrl::Sqlite {
                url: url.to_string(),
                memory,
            })
        } else {
            Err(DbError::UnsupportedUrl(redact(url)))
        }
    }

    pub fn kind(&self) -> DbKind {
        match self {
            DbUrl::Sqlite { .. } => DbKind::Sqlite,
            DbUrl::Postgres(_) => DbKind::Postgres,
        }
    }

    /// The `sqlite://` URL of a database file (`?`, `#` and `%` escaped).
    pub fn sqlite_file(path: &Path) -> String {
        let mut url = String::from("sqlite://");
        for c in path.to_string_lossy().chars() {
            match c {
                '%' => url.push_str("%25"),
                '?' => url.push_str("%3F"),
                '#' => url.push_str("%23"),
                c => url.push(c),
            }
        }
        url
    }
}

/// `url` with any password replaced by `***`, for logs and errors.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let mut out = url[..rest_start].to_string();
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..colon]);
                    out.push_str(":***");
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[authority_end..];
    // A password can also ride in the query string.
    match tail.find("password=") {
        Some(i) => {
            let value_start = i + "password=".len();
            let value_end = tail[value_start..]
                .find('&')
                .map_or(tail.len(), |e| value_start + e);
            out.push_str(&tail[..value_start]);
            out.push_str("***");
            out.push_str(&tail[value_end..]);
        }
        None => out.push_str(tail),
    }
    out
}

/// One row of the table as stored, before validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendRow {
    pub id: String,
    pub url: String,
    pub target_size: i64,
    pub max_size: i64,
    pub weight: i64,
    pub enabled: bool,
    pub reuse: String,
    /// The backend's group (`group_name`: `group` is an SQL keyword).
    #[serde(rename = "group")]
    pub group_name: String,
    pub updated_at: String,
}

/// A row whose columns could not even be read (a value of the wrong type,
/// written by hand).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnreadableRow {
    pub id: String,
    pub reason: String,
    /// The `enabled` column, when that one could be read: a disabled row asks
    /// for nothing, whatever its other values.
    pub enabled: Option<bool>,
}

/// A row as read: either its values, or why they could not be read.
pub type RowRead = Result<BackendRow, UnreadableRow>;

impl BackendRow {
    /// The spec this row asks for, or why it cannot be used.
    pub fn to_spec(&self) -> Result<BackendSpec, String> {
        let size =
            |name: &str, v: i64| usize::try_from(v).map_err(|_| format!("{name} {v} is negative"));
        let target_size = size("target_size", self.target_size)?;
        let max_size = size("max_size", self.max_size)?;
        if self.weight < 1 {
            return Err(format!("weight {} is below 1", self.weight));
        }
        let weight = u32::try_from(self.weight)
            .map_err(|_| format!("weight {} is too large", self.weight))?;
        let reuse = Reuse::from_str(&self.reuse)?;
        let spec = BackendSpec {
            id: self.id.clone(),
            url: self.url.clone(),
            target_size,
            max_size,
            weight,
            enabled: self.enabled,
            reuse,
            group: self.group_name.clone(),
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// What [`Db::seed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedOutcome {
    /// The table was empty on its first start: these many seed rows were inserted.
    Seeded(usize),
    /// The table was populated before (seeds never apply again).
    AlreadySeeded,
    /// First start, but the table already had these many rows: left as it is.
    NotEmpty(usize),
    /// First start with nothing to seed: still unseeded.
    NothingToSeed,
}

/// A partial change of one backend (`sttproxy backends set`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendPatch {
    pub url: Option<String>,
    pub target_size: Option<usize>,
    pub max_size: Option<usize>,
    pub weight: Option<u32>,
    pub reuse: Option<Reuse>,
    pub group: Option<String>,
}

impl BackendPatch {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The SQL that differs between the two kinds.
struct Dialect {
    /// How a write transaction begins. SQLite's plain `BEGIN` takes the write
    /// lock only at the first write: two read-then-write transactions then
    /// deadlock on the upgrade and one fails at once with "database is
    /// locked", the busy timeout notwithstanding. `BEGIN IMMEDIATE` takes it
    /// up front, so concurrent writers wait their turn.
    begin_write: &'static str,
    select_rows: &'static str,
    select_one: &'static str,
    select_meta_for_update: &'static str,
}

const SQLITE: Dialect = Dialect {
    select_rows: "SELECT id, url, target_size, max_size, weight, enabled, reuse, group_name, updated_at \
                  FROM backends ORDER BY id",
    select_one: "SELECT id, url, target_size, max_size, weight, enabled, reuse, group_name, updated_at \
                 FROM backends WHERE id = $1",
    select_meta_for_update: "SELECT seeded FROM sttproxy_meta WHERE id = 1",
    begin_write: "BEGIN IMMEDIATE",
};

const POSTGRES: Dialect = Dialect {
    select_rows: "SELECT id, url, target_size, max_size, weight, enabled, reuse, group_name, \
                  to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS updated_at \
                  FROM backends ORDER BY id",
    select_one: "SELECT id, url, target_size, max_size, weight, enabled, reuse, group_name, \
                 to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS updated_at \
                 FROM backends WHERE id = $1 FOR UPDATE",
    select_meta_for_update: "SELECT seeded FROM sttproxy_meta WHERE id = 1 FOR UPDATE",
    begin_write: "BEGIN",
};

const SELECT_VERSION: &str = "SELECT version FROM sttproxy_meta WHERE id = 1";
const COUNT_ROWS: &str = "SELECT COUNT(*) FROM backends";
const MARK_SEEDED: &str = "UPDATE sttproxy_meta SET seeded = $1 WHERE id = 1";
const INSERT: &str = "INSERT INTO backends \
                      (id, url, target_size, max_size, weight, enabled, reuse, group_name) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
const INSERT_SEED: &str = "INSERT INTO backends \
                           (id, url, target_size, max_size, weight, enabled, reuse, group_name) \
                           VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING";
const UPDATE: &str = "UPDATE backends SET url = $2, target_size = $3, max_size = $4, weight = $5, \
                      reuse = $6, group_name = $7 WHERE id = $1";
const SET_ENABLED: &str = "UPDATE backends SET enabled = $2 WHERE id = $1";
const DELETE: &str = "DELETE FROM backends WHERE id = $1";

#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Run `$body` with `$p` bound to whichever pool `$db` has (the body is
/// compiled once per database kind).
macro_rules! on_pool {
    ($db:expr, $p:ident => $body:expr) => {
        match &$db.pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

/// Read one row's columns; a value of the wrong type makes the row unreadable.
macro_rules! read_row {
    ($row:expr) => {{
        let row = $row;
        let read = || -> Result<BackendRow, sqlx::Error> {
            Ok(BackendRow {
                id: row.try_get("id")?,
                url: row.try_get("url")?,
                target_size: row.try_get("target_size")?,
                max_size: row.try_get("max_size")?,
                weight: row.try_get("weight")?,
                enabled: row.try_get("enabled")?,
                reuse: row.try_get("reuse")?,
                group_name: row.try_get("group_name")?,
                updated_at: row.try_get("updated_at")?,
            })
        };
        read().map_err(|e| UnreadableRow {
            id: row
                .try_get::<String, _>("id")
                .unwrap_or_else(|_| "<unreadable id>".to_string()),
            reason: e.to_string(),
            enabled: row.try_get::<bool, _>("enabled").ok(),
        })
    }};
}

/// An exclusive advisory lock (`flock`) on `<database file>-migrate.lock`,
/// held while a process migrates that database; released when dropped (or
/// when the process dies, by the kernel). A separate file: opening and
/// closing the database file itself would drop SQLite's own POSIX locks of
/// this process. The lock file stays (removing it would race).
#[derive(Debug)]
struct MigrationLock {
    _held: std::fs::File,
}

impl MigrationLock {
    async fn acquire(database: &Path) -> Result<Self, std::io::Error> {
        let mut name = database.as_os_str().to_owned();
        name.push("-migrate.lock");
        let path = std::path::PathBuf::from(name);
        // A blocking wait on a thread of its own. If the caller gives up
        // (timeout), the thread still gets the lock and releases it at once:
        // the file is dropped with the unread result.
        let locked = tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| {
                    std::io::Error::new(e.kind(), format!("opening {}: {e}", path.display()))
                })?;
            file.lock().map_err(|e| {
                std::io::Error::new(e.kind(), format!("locking {}: {e}", path.display()))
            })?;
            Ok(file)
        })
        .await
        .map_err(std::io::Error::other)?;
        locked.map(|file| Self { _held: file })
    }
}

/// A handle to the backend table. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Db {
    pool: Pool,
    /// The URL with any password hidden.
    display: String,
    /// SQLite in a file: the file (its migration lock sits beside it).
    sqlite_file: Option<std::path::PathBuf>,
}

impl Db {
    /// A pool that connects on first use (so a database that is down now does
    /// not stop the caller; the first query reports it). A new SQLite file is
    /// created on first use.
    pub fn connect_lazy(url: &str) -> Result<Self, DbError> {
        let display = redact(url);
        let bad_url = |error| DbError::BadUrl {
            url: display.clone(),
            error,
        };
        let mut sqlite_file = None;
        let pool = match DbUrl::parse(url)? {
            DbUrl::Sqlite { url, memory } => {
                let mut options = SqliteConnectOptions::from_str(&url)
                    .map_err(bad_url)?
                    .create_if_missing(true)
                    .busy_timeout(Duration::from_secs(5));
                let mut pool = SqlitePoolOptions::new().acquire_timeout(ACQUIRE_TIMEOUT);
                if memory {
                    // The database lives as long as one connection to it does.
                    pool = pool
                        .max_connections(1)
                        .min_connections(1)
                        .idle_timeout(None)
                        .max_lifetime(None);
                } else {
                    sqlite_file = Some(options.get_filename().to_path_buf());
                    // WAL: the proxy's reads never block `sttproxy backends` edits.
                    options = options.journal_mode(SqliteJournalMode::Wal);
                    pool = pool.max_connections(2);
                }
                Pool::Sqlite(pool.connect_lazy_with(options))
            }
            DbUrl::Postgres(url) => {
                let options = PgConnectOptions::from_str(&url)
                    .map_err(bad_url)?
                    .application_name("sttproxy");
                // One connection for the LISTEN, one or two for queries.
                let pool = PgPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_lazy_with(options);
                Pool::Postgres(pool)
            }
        };
        Ok(Self {
            pool,
            display,
            sqlite_file,
        })
    }

    /// Connect and run the migrations.
    pub async fn open(url: &str) -> Result<Self, DbError> {
        let db = Self::connect_lazy(url)?;
        if let Err(e) = db.migrate().await {
            return Err(db.why_no_connection(e).await);
        }
        Ok(db)
    }

    /// The pool reports a database it cannot reach as "pool timed out while
    /// waiting for an open connection", the reason lost. Then one direct
    /// connection finds it (refused, unknown host, TLS, authentication) for
    /// whoever reads the error.
    async fn why_no_connection(&self, e: DbError) -> DbError {
        let timed_out = matches!(
            &e,
            DbError::Query {
                error: sqlx::Error::PoolTimedOut,
                ..
            } | DbError::Migrate {
                error: MigrateError::Execute(sqlx::Error::PoolTimedOut),
                ..
            }
        );
        if !timed_out {
            return e;
        }
        use sqlx::ConnectOptions;
        let attempt = async {
            match &self.pool {
                Pool::Sqlite(p) => p.connect_options().connect().await.map(drop),
                Pool::Postgres(p) => p.connect_options().connect().await.map(drop),
            }
        };
        match tokio::time::timeout(ACQUIRE_TIMEOUT, attempt).await {
            Ok(Err(error)) => DbError::Connect {
                url: self.display.clone(),
                error,
            },
            _ => e,
        }
    }

    pub fn kind(&self) -> DbKind {
        match self.pool {
            Pool::Sqlite(_) => DbKind::Sqlite,
            Pool::Postgres(_) => DbKind::Postgres,
        }
    }

    /// The URL, password hidden.
    pub fn display_url(&self) -> &str {
        &self.display
    }

    /// PostgreSQL: a new pool of one connection to the same database, for a
    /// LISTEN connection of its own. Not the query pool: a LISTEN connection
    /// found dead is dropped while sqlx still runs `UNLISTEN` on it in a task
    /// of its own, which holds the connection until the dead socket errors
    /// (the peer answers or the kernel gives up); on the query pool it would
    /// hold a slot and keep [`Db::close`] waiting meanwhile.
    pub fn pg_listener_pool(&self) -> Option<PgPool> {
        match &self.pool {
            Pool::Postgres(p) => Some(
                PgPoolOptions::new()
                    .max_connections(1)
                    .min_connections(0)
                    .idle_timeout(None)
                    .max_lifetime(None)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_lazy_with((*p.connect_options()).clone()),
            ),
            Pool::Sqlite(_) => None,
        }
    }

    fn dialect(&self) -> &'static Dialect {
        match self.pool {
            Pool::Sqlite(_) => &SQLITE,
            Pool::Postgres(_) => &POSTGRES,
        }
    }

    fn query_error(&self, error: sqlx::Error) -> DbError {
        DbError::Query {
            url: self.display.clone(),
            error,
        }
    }

    /// The migrations embedded for this kind of database.
    pub fn embedded_migrations(&self) -> &'static Migrator {
        match self.pool {
            Pool::Sqlite(_) => &SQLITE_MIGRATIONS,
            Pool::Postgres(_) => &POSTGRES_MIGRATIONS,
        }
    }

    /// Apply the embedded migrations that are not applied yet.
    pub async fn migrate(&self) -> Result<(), DbError> {
        self.apply_migrations(self.embedded_migrations()).await
    }

    /// Apply `migrator`'s migrations that are not applied yet, one process at
    /// a time: a proxy and `sttproxy backends` starting together on a fresh
    /// database must not both create the table.
    ///
    /// PostgreSQL: sqlx holds an advisory lock for the whole run. SQLite:
    /// sqlx's migration lock does nothing there, and SQLite's own locks are
    /// not enough on a fresh file (the first connections switch it to WAL,
    /// and SQLite answers "database is locked" at once, without waiting, where
    /// waiting could deadlock). So a file's first connection and the whole run
    /// happen under an exclusive advisory lock on `<file>-migrate.lock` beside
    /// it ([`MigrationLock`]), and the run is one transaction begun
    /// `IMMEDIATE` (reading which versions are applied, then applying the
    /// others, atomically; sqlx's per-migration transaction becomes a
    /// savepoint in it). So SQLite migrations must be transactional (no
    /// `-- no-transaction` file).
    pub async fn apply_migrations(&self, migrator: &Migrator) -> Result<(), DbError> {
        let migrate_error = |error| DbError::Migrate {
            url: self.display.clone(),
            error,
        };
        let result = match &self.pool {
            Pool::Postgres(p) => migrator.run(p).await,
            Pool::Sqlite(p) => {
                let _lock = match &self.sqlite_file {
                    Some(file) => Some(MigrationLock::acquire(file).await.map_err(|error| {
                        DbError::MigrationLock {
                            url: self.display.clone(),
                            error,
                        }
                    })?),
                    None => None,
                };
                async {
                    let mut tx = p.begin_with(SQLITE.begin_write).await?;
                    // `run_direct` is what `Migrator::run` does once it holds
                    // a connection; `run(&mut tx)` itself cannot be proven
                    // `Send` in a spawned task ("Acquire is not general
                    // enough", the sqlx limitation this entry point is for).
                    migrator.run_direct(None, &mut *tx, false).await?;
                    tx.commit().await?;
                    Ok::<_, MigrateError>(())
                }
                .await
            }
        };
        result.map_err(migrate_error)
    }

    /// The change counter: bumped by a trigger on every change of the table.
    pub async fn version(&self) -> Result<i64, DbError> {
        let v: Result<i64, sqlx::Error> =
            on_pool!(self, p => sqlx::query_scalar(SELECT_VERSION).fetch_one(p).await);
        v.map_err(|e| self.query_error(e))
    }

    /// Every row, by id.
    pub async fn rows(&self) -> Result<Vec<RowRead>, DbError> {
        let sql = self.dialect().select_rows;
        let rows: Result<Vec<RowRead>, sqlx::Error> = on_pool!(self, p => {
            sqlx::query(sql)
                .fetch_all(p)
                .await
                .map(|rows| rows.iter().map(|r| read_row!(r)).collect())
        });
        rows.map_err(|e| self.query_error(e))
    }

    /// One row.
    pub async fn get(&self, id: &str) -> Result<Option<RowRead>, DbError> {
        let sql = self.dialect().select_one;
        let row: Result<Option<RowRead>, sqlx::Error> = on_pool!(self, p => {
            sqlx::query(sql)
                .bind(id)
                .fetch_optional(p)
                .await
                .map(|r| r.as_ref().map(|r| read_row!(r)))
        });
        row.map_err(|e| self.query_error(e))
    }

    /// Seed the table with `seeds` if it is empty on its first start; never
    /// touches a table that was populated before. Safe against other proxies
    /// seeding at the same time (PostgreSQL locks the meta row; SQLite writers
    /// are serialized).
    pub async fn seed(&self, seeds: &[BackendSpec]) -> Result<SeedOutcome, DbError> {
        let select_meta = self.dialect().select_meta_for_update;
        let begin_write = self.dialect().begin_write;
        let result: Result<SeedOutcome, sqlx::Error> = on_pool!(self, p => async {
            let mut tx = p.begin_with(begin_write).await?;
            let seeded: bool = sqlx::query_scalar(select_meta).fetch_one(&mut *tx).await?;
            if seeded {
                return Ok(SeedOutcome::AlreadySeeded);
            }
            let count: i64 = sqlx::query_scalar(COUNT_ROWS).fetch_one(&mut *tx).await?;
            let outcome = if count > 0 {
                SeedOutcome::NotEmpty(usize::try_from(count).unwrap_or(usize::MAX))
            } else if seeds.is_empty() {
                return Ok(SeedOutcome::NothingToSeed);
            } else {
                let mut inserted = 0;
                for spec in seeds {
                    let r = bind_spec(sqlx::query(INSERT_SEED), spec)
                        .execute(&mut *tx)
                        .await?;
                    inserted += usize::try_from(r.rows_affected()).unwrap_or(0);
                }
                SeedOutcome::Seeded(inserted)
            };
            sqlx::query(MARK_SEEDED).bind(true).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(outcome)
        }.await);
        result.map_err(|e| self.query_error(e))
    }

    /// Add a backend (validated first). Marks the table populated, so the
    /// settings' seed backends never apply to it.
    pub async fn add(&self, spec: &BackendSpec) -> Result<(), DbError> {
        spec.validate().map_err(|reason| DbError::Invalid {
            id: spec.id.clone(),
            reason,
        })?;
        let begin_write = self.dialect().begin_write;
        let result: Result<(), sqlx::Error> = on_pool!(self, p => async {
            let mut tx = p.begin_with(begin_write).await?;
            bind_spec(sqlx::query(INSERT), spec).execute(&mut *tx).await?;
            sqlx::query(MARK_SEEDED).bind(true).execute(&mut *tx).await?;
            tx.commit().await
        }.await);
        result.map_err(|e| match e {
            sqlx::Error::Database(d) if d.is_unique_violation() => {
                DbError::Duplicate(spec.id.clone())
            }
            e => self.query_error(e),
        })
    }

    /// Change some of a backend's values; the result is validated as a whole.
    /// Returns the backend as it is now.
    pub async fn update(&self, id: &str, patch: &BackendPatch) -> Result<BackendSpec, DbError> {
        let select_one = self.dialect().select_one;
        let begin_write = self.dialect().begin_write;
        let result: Result<Result<BackendSpec, DbError>, sqlx::Error> = on_pool!(self, p => async {
            let mut tx = p.begin_with(begin_write).await?;
            let Some(row) = sqlx::query(select_one).bind(id).fetch_optional(&mut *tx).await? else {
                return Ok(Err(DbError::NotFound(id.to_string())));
            };
            let current = match read_row!(&row) {
                Ok(r) => r,
                Err(u) => {
                    return Ok(Err(DbError::Invalid { id: id.to_string(), reason: u.reason }));
                }
            };
            let spec = match patched(&current, patch) {
                Ok(s) => s,
                Err(reason) => return Ok(Err(DbError::Invalid { id: id.to_string(), reason })),
            };
            sqlx::query(UPDATE)
                .bind(id)
                .bind(&spec.url)
                .bind(to_i64(spec.target_size))
                .bind(to_i64(spec.max_size))
                .bind(i64::from(spec.weight))
                .bind(spec.reuse.to_string())
                .bind(&spec.group)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Ok(spec))
        }.await);
        result.map_err(|e| self.query_error(e))?
    }

    /// Enable or disable a backend (a disabled one is drained and gets no sessions).
    pub async fn set_enabled(&self, id: &str, enabled: bool) -> Result<(), DbError> {
        let r = on_pool!(self, p => sqlx::query(SET_ENABLED).bind(id).bind(enabled).execute(p).await.map(|r| r.rows_affected()));
        match r.map_err(|e| self.query_error(e))? {
            0 => Err(DbError::NotFound(id.to_string())),
            _ => Ok(()),
        }
    }

    /// Delete a backend (its pool is drained).
    pub async fn remove(&self, id: &str) -> Result<(), DbError> {
        let r = on_pool!(self, p => sqlx::query(DELETE).bind(id).execute(p).await.map(|r| r.rows_affected()));
        match r.map_err(|e| self.query_error(e))? {
            0 => Err(DbError::NotFound(id.to_string())),
            _ => Ok(()),
        }
    }

    /// Close every connection (waits for those in use).
    pub async fn close(&self) {
        on_pool!(self, p => p.close().await);
    }
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Bind a spec's values to `$1..$8` of [`INSERT`] / [`INSERT_SEED`].
fn bind_spec<'q, DB>(
    q: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>,
    spec: &'q BackendSpec,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>
where
    DB: sqlx::Database,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    bool: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    q.bind(spec.id.as_str())
        .bind(spec.url.as_str())
        .bind(to_i64(spec.target_size))
        .bind(to_i64(spec.max_size))
        .bind(i64::from(spec.weight))
        .bind(spec.enabled)
        .bind(spec.reuse.to_string())
        .bind(spec.group.as_str())
}

/// `current` with `patch` applied, validated. A stored value that is invalid
/// on its own (say a negative size) can be fixed by the patch.
fn patched(current: &BackendRow, patch: &BackendPatch) -> Result<BackendSpec, String> {
    let size =
        |name: &str, v: i64| usize::try_from(v).map_err(|_| format!("{name} {v} is negative"));
    let target_size = match patch.target_size {
        Some(t) => t,
        None => size("target_size", current.target_size)?,
    };
    let max_size = match patch.max_size {
        Some(m) => m,
        None => size("max_size", current.max_size)?,
    };
    let weight = match patch.weight {
        Some(w) => w,
        None => u32::try_from(current.weight)
            .map_err(|_| format!("weight {} is out of range", current.weight))?,
    };
    let reuse = match patch.reuse {
        Some(r) => r,
        None => Reuse::from_str(&current.reuse)?,
    };
    let spec = BackendSpec {
        id: current.id.clone(),
        url: patch.url.clone().unwrap_or_else(|| current.url.clone()),
        target_size,
        max_size,
        weight,
        enabled: current.enabled,
        reuse,
        group: patch
            .group
            .clone()
            .unwrap_or_else(|| current.group_name.clone()),
    };
    spec.validate()?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> BackendRow {
        BackendRow {
            id: "a".into(),
            url: "ws://127.0.0.1:9001".into(),
            target_size: 4,
            max_size: 8,
            weight: 1,
            enabled: true,
            reuse: "fenced".into(),
            group_name: "default".into(),
            updated_at: String::new(),
        }
    }

    #[test]
    fn rows_are_validated() {
        assert!(row().to_spec().is_ok());
        type Edit = fn(&mut BackendRow);
        let cases: [(Edit, &str); 6] = [
            (|r| r.max_size = 2, "max_size 2 < target_size 4"),
            (|r| r.target_size = -1, "target_size -1 is negative"),
            (|r| r.reuse = "sometimes".into(), "unknown reuse mode"),
            (|r| r.url = "http//nope".into(), ""),
            (|r| r.weight = 0, "weight 0 is below 1"),
            (|r| r.max_size = 1 << 40, "above the limit"),
        ];
        for (edit, want) in cases {
            let mut r = row();
            edit(&mut r);
            let err = r.to_spec().unwrap_err();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn urls_are_classified_and_redacted() {
        assert_eq!(
            DbUrl::parse("postgres://u@h/db").unwrap().kind(),
            DbKind::Postgres
        );
        assert_eq!(
            DbUrl::parse("sqlite:///tmp/x.db").unwrap().kind(),
            DbKind::Sqlite
        );
        assert!(matches!(
            DbUrl::parse("sqlite::memory:").unwrap(),
            DbUrl::Sqlite { memory: true, .. }
        ));
        assert!(DbUrl::parse("mysql://h/db").is_err());
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact("postgres://h/db?user=u&password=secret&x=1"),
            "postgres://h/db?user=u&password=***&x=1"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            DbUrl::sqlite_file(Path::new("/a b/c?d#e%f.db")),
            "sqlite:///a b/c%3Fd%23e%25f.db"
        );
    }

    #[test]
    fn a_patch_is_validated_as_a_whole() {
        let p = BackendPatch {
            max_size: Some(2),
            ..BackendPatch::default()
        };
        assert!(
            patched(&row(), &p)
                .unwrap_err()
                .contains("max_size 2 < target_size 4")
        );
        let mut broken = row();
        broken.target_size = -5;
        let fix = BackendPatch {
            target_size: Some(2),
            ..BackendPatch::default()
        };
        assert_eq!(patched(&broken, &fix).unwrap().target_size, 2);
    }
}
