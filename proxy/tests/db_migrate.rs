//! Migrations: the files of `proxy/migrations/<kind>` are what gets applied
//! (a new file there is embedded and applied, not ignored), and processes
//! starting together on a fresh SQLite file migrate it once (sqlx's own
//! migration lock does nothing on SQLite).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sttproxy::Proxy;
use sttproxy::config::db::Db;
use support::db::*;
use support::{bounded, init_tracing, temp_dir};

const BIN: &str = env!("CARGO_BIN_EXE_sttproxy");

/// (version, description, checksum) of each migration.
fn listed(m: &Migrator) -> Vec<(i64, String, Vec<u8>)> {
    m.iter()
        .map(|m| (m.version, m.description.to_string(), m.checksum.to_vec()))
        .collect()
}

/// The embedded migrations are exactly the files in the source folder: with
/// `build.rs` rebuilding on any change there, a new `NNNN_*.sql` file is
/// embedded, and [`a_new_migration_file_is_applied`] shows the apply path
/// runs it.
#[tokio::test]
async fn the_embedded_migrations_are_the_source_files() {
    for (kind, url) in [
        ("sqlite", "sqlite::memory:"),
        ("postgres", "postgres://u@127.0.0.1:1/x"),
    ] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(kind);
        let from_files = Migrator::new(dir.as_path()).await.unwrap();
        let db = Db::connect_lazy(url).unwrap();
        assert_eq!(
            listed(db.embedded_migrations()),
            listed(&from_files),
            "{kind}"
        );
        assert!(!listed(&from_files).is_empty());
    }
}

/// A migration folder with one more file than the source's (the next number)
/// applied by the same function the proxy and the CLI use: the new version is
/// recorded and its change is there; applying again changes nothing.
#[tokio::test]
async fn a_new_migration_file_is_applied() {
    let dir = temp_dir("migrate");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    let folder = dir.path().join("migrations");
    std::fs::create_dir_all(&folder).unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, folder.join(path.file_name().unwrap())).unwrap();
    }
    let source_versions: Vec<i64> = listed(&Migrator::new(source.as_path()).await.unwrap())
        .into_iter()
        .map(|(v, _, _)| v)
        .collect();
    let next = source_versions.last().unwrap() + 1;
    std::fs::write(
        folder.join(format!("{next:04}_backend_note.sql")),
        "ALTER TABLE backends ADD COLUMN note TEXT NOT NULL DEFAULT 'none';\n",
    )
    .unwrap();
    let url = sqlite_url(dir.path(), "m.db");
    let db = Db::open(&url).await.unwrap();
    db.add(&spec("a", "ws://127.0.0.1:1", 1, 2)).await.unwrap();
    let versions = async || -> Vec<i64> {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let v = sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        v
    };
    assert_eq!(versions().await, source_versions);
    // Migrated under the cross-process lock beside the file.
    assert!(dir.path().join("m.db-migrate.lock").exists());

    let with_new_file = Migrator::new(folder.as_path()).await.unwrap();
    let with_next: Vec<i64> = source_versions.iter().copied().chain([next]).collect();
    db.apply_migrations(&with_new_file).await.unwrap();
    assert_eq!(versions().await, with_next);
    db.apply_migrations(&with_new_file).await.unwrap();
    assert_eq!(versions().await, with_next);
    {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let note: String = sqlx::query_scalar("SELECT note FROM backends WHERE id = 'a'")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(note, "none");
        c.close().await.unwrap();
    }
    // The rows still read as before.
    assert_eq!(db.rows().await.unwrap().len(), 1);
    db.close().await;
}

/// Migration 0002 (backend groups) on a table made by 0001 with a row in it:
/// the row is in the group `default` (routing as before), and a hand edit of
/// `group_name` bumps the change counter (the proxy sees it) and refreshes
/// `updated_at` (the touch trigger, recreated to watch the new column).
#[tokio::test]
async fn the_group_migration_keeps_rows_in_default_and_sees_hand_edits() {
    use sqlx::Connection;
    let dir = temp_dir("migrate-group");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    let first_only = dir.path().join("first");
    std::fs::create_dir_all(&first_only).unwrap();
    std::fs::copy(
        source.join("0001_backends.sql"),
        first_only.join("0001_backends.sql"),
    )
    .unwrap();
    let url = sqlite_url(dir.path(), "g.db");
    let db = Db::connect_lazy(&url).unwrap();
    db.apply_migrations(&Migrator::new(first_only.as_path()).await.unwrap())
        .await
        .unwrap();
    let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("INSERT INTO backends (id, url) VALUES ('a', 'ws://127.0.0.1:1')")
        .execute(&mut c)
        .await
        .unwrap();
    db.migrate().await.unwrap();
    let rows = db.rows().await.unwrap();
    let row = rows[0].as_ref().unwrap();
    assert_eq!(row.group_name, "default");
    assert_eq!(row.to_spec().unwrap().group, "default");

    let long_ago = "2000-01-01T00:00:00.000Z";
    sqlx::query("UPDATE backends SET updated_at = $1 WHERE id = 'a'")
        .bind(long_ago)
        .execute(&mut c)
        .await
        .unwrap();
    let version = db.version().await.unwrap();
    sqlx::query("UPDATE backends SET group_name = 'diarize' WHERE id = 'a'")
        .execute(&mut c)
        .await
        .unwrap();
    assert!(db.version().await.unwrap() > version);
    let rows = db.rows().await.unwrap();
    let row = rows[0].as_ref().unwrap();
    assert_eq!(row.group_name, "diarize");
    assert_ne!(
        row.updated_at, long_ago,
        "the touch trigger watches group_name"
    );
    c.close().await.unwrap();
    db.close().await;
}

/// all starting on a fresh SQLite file: every one migrates or finds it
/// migrated; none fails with "table backends already exists" or "database
/// is locked". The race is narrow: with sqlx's migrator alone a run of these
/// rounds failed in round 63 ("database is locked"), with only the
/// `BEGIN IMMEDIATE` transaction in round 92 (SQLite gives up at once where
/// waiting could deadlock, while the first connections switch the fresh file
/// to WAL); hence 100 rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_starts_on_a_fresh_sqlite_file_all_succeed() {
    init_tracing();
    bounded(Duration::from_secs(120), async {
        let dir = temp_dir("firststart");
        for round in 0..100 {
            let url = sqlite_url(dir.path(), &format!("tasks{round}.db"));
            let opens: Vec<_> = (0..8)
                .map(|_| {
                    let url = url.clone();
                    tokio::spawn(async move {
                        let db = Db::open(&url).await.map_err(|e| e.to_string())?;
                        db.close().await;
                        Ok::<_, String>(())
                    })
                })
                .collect();
            for open in opens {
                open.await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("round {round}: {e}"));
            }
        }
        for round in 0..3 {
            let url = sqlite_url(dir.path(), &format!("procs{round}.db"));
            let clis: Vec<_> = (0..6)
                .map(|_| {
                    Command::new(BIN)
                        .args(["backends", "list", "--db", &url])
                        .env("RUST_BACKTRACE", "0")
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::piped())
                        .spawn()
                        .unwrap()
                })
                .collect();
            let proxy = Proxy::start(&settings(&url, Duration::from_millis(200)))
                .await
                .unwrap_or_else(|e| panic!("round {round}: the proxy failed: {e}"));
            for cli in clis {
                let out = tokio::task::spawn_blocking(move || cli.wait_with_output().unwrap())
                    .await
                    .unwrap();
                assert!(
                    out.status.success(),
                    "round {round}: backends list failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            proxy.shutdown().await;
        }
    })
    .await;
}
