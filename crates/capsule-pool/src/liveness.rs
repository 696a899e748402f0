//! Knowing, without asking the session, that a worker process is gone: a pidfd
//! (`pidfd_open(2)`) per worker. Becomes readable when the process exits, so the pool is told
//! by the kernel (an event, not a poll), and a zero-timeout `poll(2)` on the acquire hit path
//! costs about a microsecond and closes the window before the watcher task has run.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Liveness of one worker process.
#[derive(Debug)]
pub(crate) struct Liveness {
    pub pid: u32,
    fd: Option<OwnedFd>,
    dead: AtomicBool,
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl Liveness {
    /// Opens a pidfd for `pid`. Without one (old kernel), liveness falls back to the session's
    /// own state on release and to `kill(pid, 0)`.
    pub fn new(pid: u32) -> Arc<Self> {
        let fd = match pidfd_open(pid) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::debug!(pid, error = %e, "pidfd_open failed; liveness via kill(0)");
                None
            }
        };
        Arc::new(Liveness {
            pid,
            fd,
            dead: AtomicBool::new(false),
        })
    }

    /// Whether the process has exited (non-blocking; no await).
    pub fn is_dead(&self) -> bool {
        if self.dead.load(Ordering::Acquire) {
            return true;
        }
        let exited = match &self.fd {
            Some(fd) => {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, zero timeout.
                let n = unsafe { libc::poll(&mut p, 1, 0) };
                n > 0 && p.revents != 0
            }
            None => {
                // SAFETY: kill with signal 0 only checks existence.
                let rc = unsafe { libc::kill(self.pid as libc::pid_t, 0) };
                rc != 0
            }
        };
        if exited {
            self.dead.store(true, Ordering::Release);
        }
        exited
    }

    /// Resolves when the process exits: `true` once it has, `false` at once when there is
    /// no pidfd to wait on (the release-time check still catches the death).
    pub async fn exited(self: Arc<Self>) -> bool {
        let Some(fd) = self.fd.as_ref().and_then(|fd| fd.try_clone().ok()) else {
            return false;
        };
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open (and is not
        // reused) until the AsyncFd, and with it the registration, is dropped.
        let registered = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) };
        match registered {
            Ok(afd) => {
                let _ = afd.readable().await;
                self.dead.store(true, Ordering::Release);
                true
            }
            Err(_) => false,
        }
    }
}
