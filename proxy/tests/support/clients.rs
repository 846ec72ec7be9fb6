//! Independent WebSocket clients for the tests (clients nobody here wrote):
//! Python's `websockets` in a virtualenv, Node's `ws` installed with npm, and
//! headless Chromium, each set up on first use under the target directory.

use std::process::Command;

/// The websockets version baseline/python/requirements.txt pins.
pub fn pinned_websockets_version() -> String {
    let path = super::workspace_dir().join("baseline/python/requirements.txt");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .find_map(|l| l.trim().strip_prefix("websockets=="))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no websockets== pin in {}", path.display()))
}

pub fn run(cmd: &mut Command) -> std::process::Output {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `target/py-test-venv` with the pinned websockets, made if absent or wrong.
pub fn python_venv() -> std::path::PathBuf {
    let version = pinned_websockets_version();
    let venv = super::target_dir().join("py-test-venv");
    let python = venv.join("bin/python");
    let check = format!(
        "import sys, websockets; sys.exit(0 if websockets.__version__ == {version:?} else 1)"
    );
    if Command::new(&python)
        .args(["-c", &check])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return venv;
    }
    match Command::new("python3").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        other => panic!(
            "python3 is required by this test (an independent WebSocket client) \
             and was not found ({other:?}): install python3 with venv and pip"
        ),
    }
    // Build aside, then move into place, so concurrent runs never see half a venv.
    let tmp = super::target_dir().join(format!("py-test-venv.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    run(Command::new("python3").args(["-m", "venv"]).arg(&tmp));
    let pip = Command::new(tmp.join("bin/python"))
        .args(["-m", "pip", "--version"])
        .output();
    if !pip.as_ref().is_ok_and(|o| o.status.success()) {
        panic!(
            "pip is not available in a python3 venv ({pip:?}): install python3-pip / python3-venv"
        );
    }
    run(Command::new(tmp.join("bin/python")).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("websockets=={version}"),
    ]));
    let _ = std::fs::remove_dir_all(&venv);
    if std::fs::rename(&tmp, &venv).is_err() {
        // Another run got there first.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    run(Command::new(&python).args(["-c", &check]));
    venv
}

/// Whether a missing client fails the test instead of skipping it
/// (`REQUIRE_CLIENTS=1`, as CI sets it).
pub fn clients_required() -> bool {
    std::env::var("REQUIRE_CLIENTS").is_ok_and(|v| v == "1")
}

/// Print why a test is skipped, or, under `REQUIRE_CLIENTS=1`, fail with it.
pub fn skip_or_fail(reason: &str) {
    assert!(!clients_required(), "REQUIRE_CLIENTS=1: {reason}");
    eprintln!("skipped: {reason}");
}

/// The version of Node's `ws` the tests install.
pub const NODE_WS_VERSION: &str = "8.18.3";

/// [`node_ws`] off the runtime and bounded: the modules' directory, or `None`
/// where Node's `ws` cannot be had (the test is skipped with the reason
/// printed, or fails under `REQUIRE_CLIENTS=1`).
pub async fn node_ws_or_skip() -> Option<std::path::PathBuf> {
    let setup = super::within(
        std::time::Duration::from_secs(300),
        "installing Node's ws",
        tokio::task::spawn_blocking(node_ws),
    )
    .await
    .expect("the install task");
    match setup {
        Ok(modules) => Some(modules),
        Err(reason) => {
            skip_or_fail(&format!("Node's ws: {reason}"));
            None
        }
    }
}

/// `target/node-clients/node_modules` with the pinned `ws`, installed with npm
/// if absent or another version; `Err` with the reason if node or npm is
/// missing or the install fails.
pub fn node_ws() -> Result<std::path::PathBuf, String> {
    let dir = super::target_dir().join("node-clients");
    let modules = dir.join("node_modules");
    let installed = |modules: &std::path::Path| {
        std::fs::read_to_string(modules.join("ws/package.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v["version"] == NODE_WS_VERSION)
    };
    for tool in ["node", "npm"] {
        match Command::new(tool).arg("--version").output() {
            Ok(o) if o.status.success() => {}
            other => return Err(format!("{tool} is not available ({other:?})")),
        }
    }
    if installed(&modules) {
        return Ok(modules);
    }
    // Install aside, then move into place, so concurrent runs never see half an install.
    let tmp = super::target_dir().join(format!("node-clients.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    let out = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
        .arg(&tmp)
        .arg(format!("ws@{NODE_WS_VERSION}"))
        .output()
        .map_err(|e| format!("running npm: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "npm install ws@{NODE_WS_VERSION} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another run got there first.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    if installed(&modules) {
        Ok(modules)
    } else {
        Err(format!(
            "ws@{NODE_WS_VERSION} is not in {}",
            modules.display()
        ))
    }
}

/// Debian's Chromium, or `$CHROMIUM`.
pub fn chromium_binary() -> Result<std::path::PathBuf, String> {
    let bin = std::env::var_os("CHROMIUM")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromium".into());
    match Command::new(&bin).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(bin),
        other => Err(format!("{} is not available ({other:?})", bin.display())),
    }
}

/// A headless Chromium with one blank page, driven over the DevTools
/// protocol; killed (and its profile removed) on drop.
pub struct Chromium {
    child: std::process::Child,
    profile: std::path::PathBuf,
    /// The page's DevTools WebSocket.
    page: super::Ws,
    next_id: u64,
    /// DevTools events (messages with a `method`) read while waiting for a
    /// command's answer, oldest first.
    events: Vec<serde_json::Value>,
}

impl Chromium {
    /// Start `bin` headless on `about:blank` with a fresh profile and connect
    /// to the page's DevTools endpoint.
    pub async fn launch(bin: &std::path::Path) -> Self {
        Self::launch_with_home(bin, None).await
    }

    /// As [`Chromium::launch`], with `HOME` set to `home` (where Chromium on
    /// Linux finds its NSS certificate database, `.pki/nssdb`).
    pub async fn launch_with_home(bin: &std::path::Path, home: Option<&std::path::Path>) -> Self {
        use std::io::BufRead;
        use std::process::Stdio;

        let profile = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "chromium-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&profile).expect("creating the Chromium profile dir");
        let mut cmd = Command::new(bin);
        if let Some(home) = home {
            cmd.env("HOME", home);
        }
        let mut child = cmd
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning chromium");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut seen = String::new();
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(Ok(url.trim().to_string()));
                    }
                } else if tx.is_some() {
                    seen.push_str(&line);
                    seen.push('\n');
                }
            }
            if let Some(tx) = tx.take() {
                let _ = tx.send(Err(seen));
            }
        });
        let browser_url = match tokio::time::timeout(std::time::Duration::from_secs(30), rx).await {
            Ok(Ok(Ok(url))) => url,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromium printed no DevTools endpoint: {other:?}");
            }
        };
        // ws://127.0.0.1:PORT/devtools/browser/ID → the page's endpoint from /json/list.
        let authority = browser_url
            .strip_prefix("ws://")
            .and_then(|r| r.split('/').next())
            .expect("a ws:// DevTools url")
            .to_string();
        let addr: std::net::SocketAddr = authority.parse().expect("DevTools address");
        let page_url = super::within(super::STEP, "the page's DevTools endpoint", async {
            loop {
                let list = super::http_get(addr, "/json/list").await;
                let targets: serde_json::Value =
                    serde_json::from_str(&list.body).unwrap_or_default();
                let page = targets.as_array().and_then(|all| {
                    all.iter()
                        .find(|t| t["type"] == "page")
                        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                        .map(str::to_string)
                });
                if let Some(url) = page {
                    return url;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .await;
        let (page, _) = tokio_tungstenite::connect_async(page_url.as_str())
            .await
            .expect("connecting to the page's DevTools endpoint");
        Self {
            child,
            profile,
            page,
            next_id: 0,
            events: Vec::new(),
        }
    }

    /// Send a DevTools command to the page; its `result`, or the error.
    pub async fn command(
        &mut self,
        method: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::Message;

        self.next_id += 1;
        let id = self.next_id;
        let command = serde_json::json!({"id": id, "method": method, "params": params});
        self.page
            .send(Message::text(command.to_string()))
            .await
            .map_err(|e| format!("sending to DevTools: {e}"))?;
        loop {
            let v = self.next_message().await?;
            if v["id"] != id {
                if v.get("method").is_some() {
                    self.events.push(v);
                }
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(format!("DevTools error: {e}"));
            }
            return Ok(v["result"].clone());
        }
    }

    /// The next JSON message from the page's DevTools endpoint.
    async fn next_message(&mut self) -> Result<serde_json::Value, String> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;

        loop {
            let msg = self
                .page
                .next()
                .await
                .ok_or("DevTools connection ended")?
                .map_err(|e| format!("DevTools: {e}"))?;
            if let Message::Text(text) = msg {
                return serde_json::from_str(text.as_str())
                    .map_err(|e| format!("DevTools JSON: {e}"));
            }
        }
    }

    /// The first DevTools event (already read or still to come) for which
    /// `matches` holds, removed from the backlog.
    pub async fn wait_event(
        &mut self,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value, String> {
        if let Some(i) = self.events.iter().position(&matches) {
            return Ok(self.events.remove(i));
        }
        loop {
            let v = self.next_message().await?;
            if matches(&v) {
                return Ok(v);
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Evaluate `expression` in the page, awaiting the promise it returns;
    /// the value (by value), or the exception as an `Err`.
    pub async fn evaluate(&mut self, expression: &str) -> Result<serde_json::Value, String> {
        let result = self
            .command(
                "Runtime.evaluate",
                serde_json::json!({
                    "expression": expression,
                    "awaitPromise": true,
                    "returnByValue": true,
                }),
            )
            .await?;
        if let Some(e) = result.get("exceptionDetails") {
            return Err(format!("exception: {e}"));
        }
        Ok(result["result"]["value"].clone())
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
