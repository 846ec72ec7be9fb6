//! Zero-downtime binary upgrade: the listening sockets handed from a running
//! proxy to a new process through a Unix socket (`SCM_RIGHTS`), the way
//! HAProxy (`-x`) and Envoy's hot restart do it.
//!
//! Why hand the sockets over rather than bind a second one with
//! `SO_REUSEPORT`: every `SO_REUSEPORT` socket has its own accept queue, and
//! the connections the kernel already queued on the old process's socket are
//! reset when it closes it; a handed-over socket is the very same kernel
//! socket, so its queue is never lost, and no connect is refused at any
//! moment of the upgrade.
//!
//! The exchange on `upgrade_socket` (one byte each way, in order):
//!
//! 1. the new process connects; the old one checks that the peer runs as its
//!    own user (`SO_PEERCRED`) and sends [`OFFER`] with the client and admin
//!    listeners' descriptors attached;
//! 2. the new process starts (pools warm, a backend healthy), starts
//!    accepting on those very sockets (both processes accept for a moment:
//!    each connection goes to one of them), and sends [`READY`];
//! 3. the old process stops accepting, drops its copies of the listeners,
//!    removes its socket file and answers [`DONE`]; then it drains like on
//!    SIGTERM (sessions get `shutdown_grace`, then 1001) and exits. Connections
//!    it accepted before step 3 are served by it to their end.
//! 4. the new process binds `upgrade_socket` itself (a fresh file renamed
//!    over the path, mode 0600), ready for the next upgrade.
//!
//! A new process that fails before step 2 (a bad setting, no healthy
//! backend, a crash) closes the connection or never answers: the old process
//! logs it and keeps serving, never having stopped. A socket file left by a
//! dead process (connection refused) is treated as no running proxy.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};

/// Old → new: the listeners' descriptors come attached to this byte.
const OFFER: u8 = b'L';
/// New → old: serving on the handed-over listeners.
const READY: u8 = b'R';
/// Old → new: no longer accepting.
const DONE: u8 = b'D';

/// How long a new process may take between receiving the listeners and
/// saying it serves (its start, pools warming) before the old one gives up
/// on it and waits for another.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long each short step of the exchange may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// `sun_path` holds 108 bytes with its NUL; the temporary name adds a suffix.
const MAX_PATH: usize = 80;

/// Why an upgrade step failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("upgrade socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("upgrade socket {path}: {reason}")]
    Protocol { path: String, reason: String },
}

/// Check `upgrade_socket` before anything starts.
pub fn check_path(path: &Path) -> Result<(), String> {
    let len = path.as_os_str().len();
    if len == 0 {
        return Err("upgrade_socket must not be empty".into());
    }
    if len > MAX_PATH {
        return Err(format!(
            "upgrade_socket {} is {len} bytes long; at most {MAX_PATH} (a Unix socket's path is short)",
            path.display()
        ));
    }
    Ok(())
}

/// The listening sockets a new process received from the old one.
#[derive(Debug)]
pub struct Inherited {
    pub client: std::net::TcpListener,
    pub admin: std::net::TcpListener,
}

impl Inherited {
    /// Tokio listeners of both sockets (must be called on the runtime).
    pub fn into_tokio(self) -> std::io::Result<(tokio::net::TcpListener, tokio::net::TcpListener)> {
        self.client.set_nonblocking(true)?;
        self.admin.set_nonblocking(true)?;
        Ok((
            tokio::net::TcpListener::from_std(self.client)?,
            tokio::net::TcpListener::from_std(self.admin)?,
        ))
    }
}

/// A new process's side of the exchange, holding the connection to the old one.
#[derive(Debug)]
pub struct Predecessor {
    stream: UnixStream,
    path: PathBuf,
}

/// Look for a running proxy at `path` and take its listeners. `None` when
/// there is none (no file, or a stale file nobody listens on).
pub async fn take_over(path: &Path) -> Result<Option<(Predecessor, Inherited)>, UpgradeError> {
    let io = |source| UpgradeError::Io {
        path: path.display().to_string(),
        source,
    };
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(io(e)),
    };
    let fds = tokio::time::timeout(STEP_TIMEOUT, receive_fds(&stream))
        .await
        .map_err(|_| protocol(path, "the running proxy sent no listeners within 10s"))?
        .map_err(io)?;
    let [client, admin]: [OwnedFd; 2] = fds.try_into().map_err(|fds: Vec<OwnedFd>| {
        protocol(
            path,
            &format!("expected 2 listeners, received {}", fds.len()),
        )
    })?;
    let inherited = Inherited {
        client: std::net::TcpListener::from(client),
        admin: std::net::TcpListener::from(admin),
    };
    // Not a listening TCP socket (or not a socket at all): no address.
    inherited.client.local_addr().map_err(io)?;
    inherited.admin.local_addr().map_err(io)?;
    Ok(Some((
        Predecessor {
            stream,
            path: path.to_path_buf(),
        },
        inherited,
    )))
}

fn protocol(path: &Path, reason: &str) -> UpgradeError {
    UpgradeError::Protocol {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Receive [`OFFER`] and the descriptors attached to it.
async fn receive_fds(stream: &UnixStream) -> std::io::Result<Vec<OwnedFd>> {
    loop {
        stream.readable().await?;
        let received = stream.try_io(Interest::READABLE, || {
            let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut byte = [0u8; 1];
            let msg = rustix::net::recvmsg(
                stream,
                &mut [std::io::IoSliceMut::new(&mut byte)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )?;
            let mut fds = Vec::new();
            for m in control.drain() {
                if let RecvAncillaryMessage::ScmRights(rights) = m {
                    fds.extend(rights);
                }
            }
            Ok((msg.bytes, byte[0], msg.flags, fds))
        });
        let (bytes, byte, flags, fds) = match received {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if bytes == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the running proxy closed the connection",
            ));
        }
        if byte != OFFER || flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "unexpected message from the running proxy",
            ));
        }
        return Ok(fds);
    }
}

impl Predecessor {
    /// Tell the old process this one serves; wait until it stopped accepting.
    /// An error here leaves this process serving (the old one may have died
    /// meanwhile, which is no harm now).
    pub async fn confirm(mut self) -> Result<(), UpgradeError> {
        let path = self.path.clone();
        let io = |source| UpgradeError::Io {
            path: path.display().to_string(),
            source,
        };
        self.stream.write_all(&[READY]).await.map_err(io)?;
        let mut byte = [0u8; 1];
        tokio::time::timeout(STEP_TIMEOUT, self.stream.read_exact(&mut byte))
            .await
            .map_err(|_| protocol(&path, "the old proxy did not stop accepting within 10s"))?
            .map_err(io)?;
        if byte[0] != DONE {
            return Err(protocol(&path, "unexpected answer from the old proxy"));
        }
        Ok(())
    }
}

/// The running proxy's side: listens on `upgrade_socket` for a successor.
/// Dropping it removes the socket file, unless another process has put its
/// own there since.
#[derive(Debug)]
pub struct UpgradeSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The file's device and inode as bound: whose file is at `path`.
    file: (u64, u64),
}

impl UpgradeSocket {
    /// Bind `path` with mode 0600: bound under a temporary name, then renamed
    /// over `path`, so that the path always names a live socket (or a stale
    /// one) and never a half-made file. Must be called on the runtime.
    pub fn bind(path: &Path) -> Result<Self, UpgradeError> {
        let io = |source| UpgradeError::Io {
            path: path.display().to_string(),
            source,
        };
        // Renamed over: never over something that is not a socket (a
        // mistyped path naming a settings file, say).
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(UpgradeError::Protocol {
                    path: path.display().to_string(),
                    reason: "exists and is not a socket; not replacing it".into(),
                });
            }
            _ => {}
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".new-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        // A leftover of an earlier process with this pid.
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(io)?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::metadata(&tmp))
            .and_then(|meta| std::fs::rename(&tmp, path).map(|()| meta));
        let meta = match placed {
            Ok(meta) => meta,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(io(e));
            }
        };
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            file: (meta.dev(), meta.ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Offer `client` and `admin` to each process that connects until one
    /// says it serves; that one is returned. A process that fails before
    /// (closes, times out, another user) is logged and the next one awaited:
    /// this proxy keeps serving throughout. Cancel-safe.
    pub async fn successor(&self, client: BorrowedFd<'_>, admin: BorrowedFd<'_>) -> Successor {
        loop {
            let stream = match self.listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "upgrade socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match offer(stream, client, admin).await {
                Ok(stream) => return Successor { stream },
                Err(reason) => tracing::warn!(
                    socket = %self.path.display(),
                    %reason,
                    "upgrade attempt failed; this process keeps serving"
                ),
            }
        }
    }
}

impl Drop for UpgradeSocket {
    fn drop(&mut self) {
        let ours = std::fs::metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.file)
            .unwrap_or(false);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// One attempt: check the peer, send the listeners, await [`READY`].
async fn offer(
    stream: UnixStream,
    client: BorrowedFd<'_>,
    admin: BorrowedFd<'_>,
) -> Result<UnixStream, String> {
    let peer = rustix::net::sockopt::socket_peercred(&stream)
        .map_err(|e| format!("reading the peer's credentials: {e}"))?;
    let me = rustix::process::getuid();
    if peer.uid != me {
        return Err(format!(
            "peer pid {} runs as uid {}, not as this process's {}",
            peer.pid.as_raw_nonzero(),
            peer.uid.as_raw(),
            me.as_raw()
        ));
    }
    tokio::time::timeout(STEP_TIMEOUT, send_fds(&stream, client, admin))
        .await
        .map_err(|_| "sending the listeners timed out".to_string())?
        .map_err(|e| format!("sending the listeners: {e}"))?;
    tracing::info!(
        pid = peer.pid.as_raw_nonzero(),
        "upgrade: listeners handed to a new process; waiting until it serves"
    );
    let mut stream = stream;
    let mut byte = [0u8; 1];
    match tokio::time::timeout(READY_TIMEOUT, stream.read_exact(&mut byte)).await {
        Err(_) => Err(format!(
            "the new process did not say it serves within {READY_TIMEOUT:?}"
        )),
        Ok(Err(e)) => Err(format!("the new process went away before serving: {e}")),
        Ok(Ok(_)) if byte[0] != READY => Err("unexpected message from the new process".into()),
        Ok(Ok(_)) => Ok(stream),
    }
}

async fn send_fds(
    stream: &UnixStream,
    client: BorrowedFd<'_>,
    admin: BorrowedFd<'_>,
) -> std::io::Result<()> {
    let fds = [client, admin];
    loop {
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(std::io::Error::other("control buffer too small"));
            }
            Ok(rustix::net::sendmsg(
                stream.as_fd(),
                &[std::io::IoSlice::new(&[OFFER])],
                &mut control,
                SendFlags::NOSIGNAL,
            )?)
        });
        match sent {
            Ok(1) => return Ok(()),
            Ok(n) => {
                return Err(std::io::Error::other(format!(
                    "sent {n} bytes of the offer"
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The new process that took the listeners over, once it serves.
#[derive(Debug)]
pub struct Successor {
    stream: UnixStream,
}

impl Successor {
    /// Tell it this process no longer accepts (call once it stopped).
    pub async fn done(mut self) {
        if let Err(e) = self.stream.write_all(&[DONE]).await {
            tracing::debug!(error = %e, "upgrade: the new process did not take the last word");
        }
    }
}
