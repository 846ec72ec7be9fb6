//! `sttproxy backends list|add|set|remove|enable|disable` (the binary) against a
//! temporary SQLite file and, where one answers, a fresh PostgreSQL database;
//! and `sttproxy serve` with its default SQLite table, seeding, and a bad row
//! rejected with a clear log line and a metric.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use support::db::*;
use support::{bounded, eventually, temp_dir};

const BIN: &str = env!("CARGO_BIN_EXE_sttproxy");

/// Run `sttproxy backends ARGS --db DB`: (success, stdout, stderr).
fn backends(db: &str, args: &[&str]) -> (bool, String, String) {
    let mut args = args.to_vec();
    args.extend(["--db", db]);
    backends_in(std::path::Path::new("."), None, &args)
}

fn ok(db: &str, args: &[&str]) -> String {
    let (success, out, err) = backends(db, args);
    assert!(success, "sttproxy backends {args:?} failed: {err}");
    out
}

fn fails(db: &str, args: &[&str], message: &str) {
    let (success, out, err) = backends(db, args);
    assert!(
        !success,
        "sttproxy backends {args:?} should fail, printed {out}"
    );
    assert!(
        err.contains(message),
        "sttproxy backends {args:?}: expected {message:?} in {err:?}"
    );
    assert!(!err.contains("Stack backtrace"), "{err}");
}

fn list(db: &str) -> Vec<Value> {
    let out = ok(db, &["list", "--format", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["backends"].as_array().unwrap().clone()
}

/// Every subcommand, its errors, both output formats.
fn exercise(db: &str) {
    assert!(list(db).is_empty());
    assert!(ok(db, &["list"]).contains("(no backends)"));

    let out = ok(db, &["add", "--url", "ws://127.0.0.1:9001"]);
    assert!(out.contains("added backend 127.0.0.1:9001"), "{out}");
    ok(
        db,
        &[
            "add",
            "--url",
            "ws://127.0.0.1:9002/v1",
            "--id",
            "gpu-2",
            "--target",
            "4",
            "--max",
            "8",
            "--weight",
            "3",
            "--reuse",
            "none",
            "--group",
            "diarize",
        ],
    );
    let rows = list(db);
    assert_eq!(rows.len(), 2);
    let default = &rows[0];
    assert_eq!(default["id"], "127.0.0.1:9001");
    assert_eq!(default["url"], "ws://127.0.0.1:9001");
    assert_eq!(default["target_size"], 16);
    assert_eq!(default["max_size"], 1024);
    assert_eq!(default["weight"], 1);
    assert_eq!(default["enabled"], true);
    assert_eq!(default["reuse"], "fenced");
    assert_eq!(default["group"], "default");
    assert_eq!(default["error"], Value::Null);
    let gpu = &rows[1];
    assert_eq!(
        (
            gpu["id"].as_str(),
            gpu["target_size"].as_i64(),
            gpu["max_size"].as_i64()
        ),
        (Some("gpu-2"), Some(4), Some(8))
    );
    assert_eq!(
        (gpu["weight"].as_i64(), gpu["reuse"].as_str()),
        (Some(3), Some("none"))
    );
    assert_eq!(gpu["group"], "diarize");
    assert!(gpu["updated_at"].as_str().is_some_and(|t| t.len() >= 19));

    // Errors: duplicate id, invalid values, unknown ids.
    fails(
        db,
        &["add", "--url", "ws://127.0.0.1:9009", "--id", "gpu-2"],
        "already exists",
    );
    fails(
        db,
        &[
            "add",
            "--url",
            "ws://127.0.0.1:9009",
            "--target",
            "8",
            "--max",
            "4",
        ],
        "max_size 4 < target_size 8",
    );
    fails(
        db,
        &["add", "--url", "http://127.0.0.1:9009"],
        "127.0.0.1:9009",
    );
    fails(
        db,
        &["add", "--url", "ws://127.0.0.1:9009", "--target", "-1"],
        "-1",
    );
    fails(
        db,
        &["add", "--url", "ws://127.0.0.1:9009", "--weight", "0"],
        "weight is 0",
    );
    fails(
        db,
        &[
            "add",
            "--url",
            "ws://127.0.0.1:9009",
            "--reuse",
            "sometimes",
        ],
        "sometimes",
    );
    fails(
        db,
        &["add", "--url", "ws://127.0.0.1:9009", "--group", "a b"],
        "may hold only",
    );
    fails(db, &["set", "gpu-2", "--group", ""], "empty group");
    fails(
        db,
        &["set", "nope", "--target", "1"],
        "no backend with id \"nope\"",
    );
    fails(
        db,
        &["set", "gpu-2", "--max", "2"],
        "max_size 2 < target_size 4",
    );
    fails(db, &["set", "gpu-2"], "nothing to change");
    fails(db, &["remove", "nope"], "no backend with id \"nope\"");
    fails(db, &["enable", "nope"], "no backend with id \"nope\"");
    fails(db, &["disable", "nope"], "no backend with id \"nope\"");
    assert_eq!(list(db).len(), 2, "failed commands changed nothing");

    // set changes only what it is given.
    let out = ok(db, &["set", "gpu-2", "--target", "6", "--reuse", "fenced"]);
    assert!(out.contains("updated backend gpu-2"), "{out}");
    let gpu = list(db)[1].clone();
    assert_eq!(
        (gpu["target_size"].as_i64(), gpu["max_size"].as_i64()),
        (Some(6), Some(8))
    );
    assert_eq!(
        (gpu["weight"].as_i64(), gpu["reuse"].as_str()),
        (Some(3), Some("fenced"))
    );
    assert_eq!(gpu["group"], "diarize");
    let out = ok(db, &["set", "gpu-2", "--group", "en-US.large"]);
    assert!(out.contains("group en-US.large"), "{out}");
    assert_eq!(list(db)[1]["group"], "en-US.large");
    ok(
        db,
        &[
            "set",
            "gpu-2",
            "--url",
            "wss://gpu2.example:443/stt",
            "--max",
            "64",
            "--weight",
            "1",
        ],
    );
    let gpu = list(db)[1].clone();
    assert_eq!(gpu["url"], "wss://gpu2.example:443/stt");
    assert_eq!(
        (gpu["max_size"].as_i64(), gpu["weight"].as_i64()),
        (Some(64), Some(1))
    );

    // disable / enable / remove.
    assert!(ok(db, &["disable", "gpu-2"]).contains("disabled backend gpu-2"));
    assert_eq!(list(db)[1]["enabled"], false);
    let text = ok(db, &["list"]);
    assert!(text.lines().next().unwrap().starts_with("ID"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("gpu-2") && l.contains(" no ")),
        "{text}"
    );
    ok(db, &["enable", "gpu-2"]);
    assert_eq!(list(db)[1]["enabled"], true);
    assert!(ok(db, &["remove", "127.0.0.1:9001"]).contains("removed backend 127.0.0.1:9001"));
    let rows = list(db);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["id"], "gpu-2");
}

/// Edits at the same moment on one SQLite file all succeed: each write
/// transaction takes the write lock when it begins (`BEGIN IMMEDIATE`), so
/// two read-then-write transactions wait for each other (busy timeout)
/// instead of one failing with "database is locked" when it upgrades.
#[test]
fn concurrent_edits_of_one_sqlite_table_all_succeed() {
    let dir = temp_dir("concurrent");
    let db = sqlite_url(dir.path(), "concurrent.db");
    for id in ["a", "b"] {
        ok(&db, &["add", "--url", "ws://127.0.0.1:1", "--id", id]);
    }
    for round in 0..5 {
        let edits: Vec<_> = (0..8)
            .map(|k| {
                let db = db.clone();
                std::thread::spawn(move || {
                    let id = if k % 2 == 0 { "a" } else { "b" };
                    let target = (round * 8 + k + 1).to_string();
                    backends(&db, &["set", id, "--target", &target])
                })
            })
            .collect();
        for edit in edits {
            let (success, _, err) = edit.join().unwrap();
            assert!(success, "round {round}: a concurrent set failed: {err}");
        }
    }
}

/// Run `sttproxy backends ARGS` in `dir` with no --db, `STTPROXY_DB` as
/// given: (success, stdout, stderr).
fn backends_in(
    dir: &std::path::Path,
    env_db: Option<&str>,
    args: &[&str],
) -> (bool, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("backends")
        .args(args)
        .current_dir(dir)
        .env("RUST_BACKTRACE", "0");
    match env_db {
        Some(db) => cmd.env("STTPROXY_DB", db),
        None => cmd.env_remove("STTPROXY_DB"),
    };
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Without --db, `backends` picks the table `serve` would pick from the same
/// place: ./sttproxy.db, or beside --config, or the settings file's `db`;
/// STTPROXY_DB and --db win over the file. It says on stderr which table.
#[test]
fn backends_default_to_the_table_of_serve() {
    let dir = temp_dir("cli-default");
    let root = dir.path();
    let ids_in = |file: &str| -> Vec<String> {
        list(&sqlite_url(dir.path(), file))
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };

    // No flags: ./sttproxy.db, as `sttproxy serve` with no flags.
    let (success, _, err) = backends_in(
        root,
        None,
        &["add", "--url", "ws://127.0.0.1:1", "--id", "here"],
    );
    assert!(success, "{err}");
    assert!(
        err.contains(&format!(
            "backend table {}",
            sqlite_url(dir.path(), "sttproxy.db")
        )) && err.contains("the default of `sttproxy serve` here"),
        "{err}"
    );
    assert_eq!(ids_in("sttproxy.db"), ["here"]);

    // --config etc/sttproxy.toml: etc/sttproxy.db.
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/sttproxy.toml"), "sync_interval = \"1s\"\n").unwrap();
    let (success, _, err) = backends_in(
        root,
        None,
        &[
            "add",
            "--config",
            "etc/sttproxy.toml",
            "--url",
            "ws://127.0.0.1:1",
            "--id",
            "beside",
        ],
    );
    assert!(success, "{err}");
    assert_eq!(ids_in("etc/sttproxy.db"), ["beside"]);

    // The settings file names a table: that one.
    let named = sqlite_url(dir.path(), "named.db");
    std::fs::write(root.join("named.toml"), format!("db = \"{named}\"\n")).unwrap();
    let (success, out, err) = backends_in(root, None, &["list", "-c", "named.toml"]);
    assert!(success && out.contains("(no backends)"), "{out} {err}");
    assert!(err.contains("the settings file's `db`"), "{err}");
    assert!(std::path::Path::new(&root.join("named.db")).exists());

    // STTPROXY_DB wins over the file, silently (the user named it).
    let (success, out, err) = backends_in(
        root,
        Some(&sqlite_url(dir.path(), "sttproxy.db")),
        &["list", "-c", "named.toml", "--format", "json"],
    );
    assert!(success && out.contains("\"here\""), "{out} {err}");
    assert!(!err.contains("backend table"), "{err}");

    // A settings file that cannot be read is an error, said once.
    let (success, _, err) = backends_in(root, None, &["list", "-c", "missing.toml"]);
    assert!(!success);
    assert!(err.contains("reading missing.toml"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

/// Errors print each cause once: a database that refuses connections, a file
/// that is not a database.
#[test]
fn cli_errors_print_each_cause_once() {
    let (success, _, err) = backends("postgres://nobody@127.0.0.1:1/x", &["list"]);
    assert!(!success);
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let dir = temp_dir("cli-errors");
    std::fs::write(dir.path().join("junk.db"), vec![b'x'; 4096]).unwrap();
    let (success, _, err) = backends(&sqlite_url(dir.path(), "junk.db"), &["list"]);
    assert!(!success);
    assert_eq!(err.matches("not a database").count(), 1, "{err}");
}

#[test]
fn backends_subcommands_on_sqlite() {
    let dir = temp_dir("cli");
    let db = sqlite_url(dir.path(), "cli.db");
    exercise(&db);
    assert!(dir.path().join("cli.db").exists());
    // A row the proxy would reject is listed with the reason.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&db).await.unwrap();
        sqlx::query("INSERT INTO backends (id, url, target_size, max_size) VALUES ('bad', 'ws://h:1', 8, 2)")
            .execute(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
    });
    let bad = list(&db).into_iter().find(|r| r["id"] == "bad").unwrap();
    assert_eq!(bad["error"], "max_size 2 < target_size 8");
    assert!(ok(&db, &["list"]).contains("REJECTED: max_size 2 < target_size 8"));
    fails("mysql://127.0.0.1/x", &["list"], "unsupported database URL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_subcommands_on_postgres() {
    let Some(pg) = pg_db("cli").await else { return };
    let url = pg.url.clone();
    tokio::task::spawn_blocking(move || exercise(&url))
        .await
        .unwrap();
    pg.drop_db().await;
}

/// A running `sttproxy serve` and what it printed on stderr.
struct Serve {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Serve {
    fn start(args: &[&str], dir: &std::path::Path) -> Self {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(args)
            .current_dir(dir)
            .env_remove("STTPROXY_DB")
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        {
            let lines = stderr.clone();
            let err = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        // The first stdout line, read on a thread so that a proxy that never
        // prints it fails the test instead of hanging it.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut first = String::new();
            let _ = BufReader::new(stdout).read_line(&mut first);
            let _ = tx.send(first);
        });
        let first = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        // "sttproxy listening on ws://ADDR, admin on http://ADDR"
        let addr = |prefix: &str| -> SocketAddr {
            let start = first.find(prefix).unwrap_or_else(|| {
                panic!(
                    "no {prefix} in {first:?}; stderr: {:?}",
                    stderr.lock().unwrap()
                )
            }) + prefix.len();
            first[start..]
                .split([',', '\n'])
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let (listen, admin) = (addr("ws://"), addr("http://"));
        Self {
            child,
            listen,
            admin,
            stderr,
        }
    }

    fn logged(&self, needle: &str) -> Option<String> {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sttproxy serve --config DIR/FILE` keeps its table in DIR/sttproxy.db,
/// seeded from the file's [[backends]]; `backends` edits reach it live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_defaults_to_sqlite_next_to_the_settings_file() {
    bounded(Duration::from_secs(60), async {
        let dir = temp_dir("serve");
        let conf_dir = dir.path().join("etc");
        std::fs::create_dir_all(&conf_dir).unwrap();
        let a = start_echo().await;
        let b = start_echo().await;
        std::fs::write(
            conf_dir.join("sttproxy.toml"),
            format!(
                "sync_interval = \"200ms\"\n[[backends]]\nid = \"a\"\nurl = \"{}\"\ntarget_size = 1\nmax_size = 4\n",
                a.url()
            ),
        )
        .unwrap();
        let serve = Serve::start(&["--config", "etc/sttproxy.toml"], dir.path());
        let db_file = conf_dir.join("sttproxy.db");
        assert!(db_file.exists(), "no {}", db_file.display());
        assert_eq!(ids(&pools(serve.admin).await), ["a"]);
        assert!(serve.logged("seeded the empty backend table").is_some());
        short_session(serve.listen).await.unwrap();

        let db = sttproxy::config::db::DbUrl::sqlite_file(&db_file);
        let b_url = b.url();
        // `backends` given the same --config edits the same table.
        let root = dir.path().to_path_buf();
        let (success, _, err) = tokio::task::spawn_blocking(move || {
            backends_in(
                &root,
                None,
                &[
                    "add", "--config", "etc/sttproxy.toml", "--url", &b_url, "--id", "b",
                    "--target", "1", "--max", "2",
                ],
            )
        })
        .await
        .unwrap();
        assert!(success, "{err}");
        eventually(Duration::from_secs(3), "b added live", || async {
            ids(&pools(serve.admin).await) == ["a", "b"]
        })
        .await;
        drop(serve);

        // Restarted from the file alone: the file's [[backends]] only seed an
        // empty table, so the table stays as it is, and that is logged.
        let serve = Serve::start(&["--config", "etc/sttproxy.toml"], dir.path());
        assert_eq!(ids(&pools(serve.admin).await), ["a", "b"]);
        eventually(Duration::from_secs(3), "the ignored seeds are logged", || async {
            serve.logged("only seed an empty table").is_some()
        })
        .await;
        drop(serve);

        // Restarted with --backend naming other backends: explicit flags are
        // never silently ignored. It refuses to start, naming both lists
        // (passwords left out).
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--config", "etc/sttproxy.toml"])
            .args(["--backend", "ws://u:hunter2@127.0.0.1:1"])
            .current_dir(dir.path())
            .env_remove("STTPROXY_DB")
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        eventually(Duration::from_secs(20), "serve with other --backend exits", || {
            let exited = child.try_wait().unwrap().is_some();
            async move { exited }
        })
        .await;
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "it served; stderr:\n{err}");
        assert!(
            err.contains("already holds other backends")
                && err.contains(&a.url())
                && err.contains("ws://u:***@127.0.0.1:1")
                && !err.contains("hunter2"),
            "stderr:\n{err}"
        );

        // With --backend naming exactly the table's backends, it starts.
        let (a_url, b_url) = (a.url(), b.url());
        let serve = Serve::start(
            &["--config", "etc/sttproxy.toml", "--backend", &b_url, "--backend", &a_url],
            dir.path(),
        );
        assert_eq!(ids(&pools(serve.admin).await), ["a", "b"]);
        drop(serve);

        // Listing the table shows no password.
        let db3 = db.clone();
        let (text, json) = tokio::task::spawn_blocking(move || {
            ok(&db3, &["add", "--url", "ws://u:hunter2@127.0.0.1:9", "--id", "c"]);
            (ok(&db3, &["list"]), ok(&db3, &["list", "--format", "json"]))
        })
        .await
        .unwrap();
        for listing in [&text, &json] {
            assert!(
                listing.contains("u:***@127.0.0.1:9") && !listing.contains("hunter2"),
                "{listing}"
            );
        }
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}

/// A row with max_size < target_size is rejected with a clear log line and a
/// metric; the other rows apply; fixed with `backends set`, it applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_rejects_a_bad_row_and_applies_the_rest() {
    bounded(Duration::from_secs(60), async {
        let dir = temp_dir("badrow");
        let db = sqlite_url(dir.path(), "backends.db");
        let a = start_echo().await;
        let b = start_echo().await;
        let (db1, a_url) = (db.clone(), a.url());
        tokio::task::spawn_blocking(move || {
            ok(
                &db1,
                &[
                    "add", "--url", &a_url, "--id", "good", "--target", "1", "--max", "2",
                ],
            );
        })
        .await
        .unwrap();
        {
            use sqlx::Connection;
            let mut c = sqlx::SqliteConnection::connect(&db).await.unwrap();
            sqlx::query(
                "INSERT INTO backends (id, url, target_size, max_size) VALUES ('bad', $1, 8, 2)",
            )
            .bind(b.url())
            .execute(&mut c)
            .await
            .unwrap();
            c.close().await.unwrap();
        }
        let serve = Serve::start(&["--db", &db, "--sync-interval", "200ms"], dir.path());
        assert_eq!(ids(&pools(serve.admin).await), ["good"]);
        assert_eq!(
            metric(serve.admin, "sttproxy_config_rejected_rows").await,
            Some(1.0)
        );
        assert!(
            metric(serve.admin, "sttproxy_config_row_rejections_total")
                .await
                .unwrap()
                >= 1.0
        );
        let line = serve
            .logged("rejected backend row")
            .expect("a log line for the bad row");
        assert!(
            line.contains("bad") && line.contains("max_size 2 < target_size 8"),
            "{line}"
        );
        assert!(line.contains("WARN"), "{line}");
        short_session(serve.listen).await.unwrap();

        let db2 = db.clone();
        tokio::task::spawn_blocking(move || ok(&db2, &["set", "bad", "--max", "8"]))
            .await
            .unwrap();
        eventually(Duration::from_secs(3), "the fixed row applies", || async {
            ids(&pools(serve.admin).await) == ["bad", "good"]
        })
        .await;
        assert_eq!(
            metric(serve.admin, "sttproxy_config_rejected_rows").await,
            Some(0.0)
        );
        drop(serve);
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}
