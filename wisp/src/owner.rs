//! Owner activity on a workstation: how long since its owner last touched the keyboard or
//! the mouse. wispd reports it with every heartbeat; the registry lends a workstation out
//! only while its owner has been away long enough (Sprite's rule, 30 s by default).
//!
//! Sources, the first that applies wins:
//! 1. The override file (wispd's `--owner-file`, default `/run/wisp-owner/<host>`), written
//!    by `wisp owner HOST active|idle` (and removed by `wisp owner HOST auto`). One line:
//!    `active` (the owner is at the keyboard: idle 0 for as long as the file says so) or
//!    `idle <unix-seconds>` (away since that time). A file that does not parse is ignored
//!    with a warning. This is how the simulated cluster, whose hosts have no keyboards,
//!    plays an owner coming back; on a real workstation it lets a user lend or withhold
//!    their machine by hand.
//! 2. Input devices (`--input-devices`, default `/dev/input/event*`): a watcher thread reads
//!    every device's events without grabbing them (other readers still get every event);
//!    key, button, relative and absolute motion events count as the owner's activity,
//!    others (switches, LEDs, sync) do not. Devices are rescanned every few seconds
//!    (hotplug). Until the first event, the owner counts as active when wispd started.
//! 3. No input device at all (a server, a VM, a simulated host, or `--input-devices none`):
//!    the host counts as idle since wispd started.
//!
//! All the raw system calls of this module (open, poll, read on device nodes) are in
//! [`watch_devices`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where `wisp owner` and wispd meet by default: `<dir>/<host>`.
pub const OWNER_DIR: &str = "/run/wisp-owner";
/// Default device pattern.
pub const INPUT_DEVICES: &str = "/dev/input/event*";

/// What the override file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Override {
    /// The owner is present.
    Active,
    /// The owner has been away since this time (Unix seconds).
    IdleSince(u64),
}

/// Why an override file was ignored.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("owner file {path}: {why}")]
    Bad { path: String, why: String },
    #[error("owner file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "bad input device pattern {0:?}: expected DIR/PREFIX* (e.g. /dev/input/event*) or none"
    )]
    Pattern(String),
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The default override file of `host`.
pub fn owner_file(host: &str) -> PathBuf {
    Path::new(OWNER_DIR).join(host)
}

impl Override {
    pub fn parse(text: &str) -> Result<Override, String> {
        let mut w = text.split_whitespace();
        match (w.next(), w.next(), w.next()) {
            (Some("active"), None, _) => Ok(Override::Active),
            (Some("idle"), Some(t), None) => t
                .parse()
                .map(Override::IdleSince)
                .map_err(|_| format!("bad time {t:?}")),
            _ => Err(format!(
                "expected `active` or `idle <unix-seconds>`, found {:?}",
                text.trim()
            )),
        }
    }

    pub fn render(&self) -> String {
        match self {
            Override::Active => "active\n".into(),
            Override::IdleSince(t) => format!("idle {t}\n"),
        }
    }

    /// Owner idle seconds at `now` (Unix seconds).
    pub fn idle_secs(&self, now: u64) -> u64 {
        match self {
            Override::Active => 0,
            Override::IdleSince(t) => now.saturating_sub(*t),
        }
    }
}

/// Read the override file: `Ok(None)` when there is none.
pub fn read_override(path: &Path) -> Result<Option<Override>, OwnerError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Override::parse(&t)
            .map(Some)
            .map_err(|why| OwnerError::Bad {
                path: path.display().to_string(),
                why,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(OwnerError::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Write the override file atomically (creating its directory).
pub fn write_override(path: &Path, o: Override) -> Result<(), OwnerError> {
    let io = |source| OwnerError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, o.render()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Tracks the owner's activity on this host.
pub struct OwnerMonitor {
    file: PathBuf,
    /// Unix seconds of the newest input event (or wispd's start).
    last_input: Arc<AtomicU64>,
    /// Devices being watched right now (0: none, fallback 3 applies).
    devices: Arc<AtomicU64>,
    started: u64,
    /// The owner forbids foreign jobs (`wispd --no-foreign`): the host reports its owner
    /// as present, so placement never lends it and eviction keeps foreign jobs away.
    pub no_foreign: bool,
}

impl OwnerMonitor {
    /// Start watching `devices` (a `DIR/PREFIX*` pattern, or `None` for no devices).
    pub fn start(file: PathBuf, devices: Option<&str>) -> Result<OwnerMonitor, OwnerError> {
        let started = now_secs();
        let m = OwnerMonitor {
            file,
            last_input: Arc::new(AtomicU64::new(started)),
            devices: Arc::new(AtomicU64::new(0)),
            started,
            no_foreign: false,
        };
        if let Some(pat) = devices {
            let (dir, prefix) = split_pattern(pat)?;
            let (last, n) = (m.last_input.clone(), m.devices.clone());
            std::thread::Builder::new()
                .name("owner-input".into())
                .spawn(move || watch_devices(&dir, &prefix, &last, &n))
                .map_err(|source| OwnerError::Io {
                    path: pat.into(),
                    source,
                })?;
        }
        Ok(m)
    }

    /// How many input devices are watched now.
    pub fn devices(&self) -> u64 {
        self.devices.load(Ordering::Relaxed)
    }

    /// Seconds the owner has been away, and where that came from (for logs).
    pub fn idle_secs(&self) -> (u64, &'static str) {
        if self.no_foreign {
            return (0, "foreign jobs forbidden (--no-foreign)");
        }
        let now = now_secs();
        match read_override(&self.file) {
            Ok(Some(o)) => return (o.idle_secs(now), "override file"),
            Ok(None) => {}
            Err(e) => tracing::warn!("ignoring {e}"),
        }
        if self.devices() > 0 {
            (
                now.saturating_sub(self.last_input.load(Ordering::Relaxed)),
                "input devices",
            )
        } else {
            (
                now.saturating_sub(self.started),
                "no input device: idle since wispd started",
            )
        }
    }
}

fn split_pattern(pat: &str) -> Result<(PathBuf, String), OwnerError> {
    let bad = || OwnerError::Pattern(pat.into());
    let (dir, last) = pat.rsplit_once('/').ok_or_else(bad)?;
    let prefix = last.strip_suffix('*').ok_or_else(bad)?;
    if prefix.contains('*') || dir.contains('*') {
        return Err(bad());
    }
    Ok((
        PathBuf::from(if dir.is_empty() { "/" } else { dir }),
        prefix.to_string(),
    ))
}

/// Input event types that mean a person is there: keys and buttons, relative and absolute
/// motion.
fn is_owner_event(ty: u16) -> bool {
    matches!(ty, 1..=3) // EV_KEY, EV_REL, EV_ABS
}

/// The watcher thread: poll every device matching `dir/prefix*`, stamp `last` on events.
fn watch_devices(dir: &Path, prefix: &str, last: &AtomicU64, count: &AtomicU64) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
    const RESCAN: Duration = Duration::from_secs(5);
    let ev_size = std::mem::size_of::<libc::input_event>();
    let mut open: Vec<(PathBuf, OwnedFd)> = Vec::new();
    let mut scanned: Option<std::time::Instant> = None;
    let mut buf = vec![0u8; ev_size * 64];
    loop {
        if scanned.map(|t| t.elapsed() >= RESCAN).unwrap_or(true) {
            scanned = Some(std::time::Instant::now());
            let entries = std::fs::read_dir(dir)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.path())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            for p in entries {
                let matches = p
                    .file_name()
                    .map(|n| n.as_bytes().starts_with(prefix.as_bytes()))
                    .unwrap_or(false);
                if !matches || open.iter().any(|(q, _)| *q == p) {
                    continue;
                }
                let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
                    continue;
                };
                // SAFETY: c is a valid NUL-terminated path; the returned fd is owned below.
                let fd = unsafe {
                    libc::open(
                        c.as_ptr(),
                        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
                    )
                };
                if fd < 0 {
                    tracing::debug!(dev = %p.display(), "cannot open input device: {}", std::io::Error::last_os_error());
                    continue;
                }
                tracing::info!(dev = %p.display(), "watching input device for owner activity");
                // SAFETY: fd was just returned by open and is owned by nobody else.
                open.push((p, unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            count.store(open.len() as u64, Ordering::Relaxed);
        }
        if open.is_empty() {
            std::thread::sleep(RESCAN);
            continue;
        }
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .map(|(_, f)| libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: fds is a valid array of fds.len() pollfd structs for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if n <= 0 {
            continue;
        }
        let mut gone = Vec::new();
        for (i, pfd) in fds.iter().enumerate() {
            if pfd.revents == 0 {
                continue;
            }
            let mut active = false;
            let mut dead = pfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0;
            loop {
                // SAFETY: buf is valid for buf.len() bytes; fd is open.
                let r = unsafe { libc::read(pfd.fd, buf.as_mut_ptr().cast(), buf.len()) };
                if r < 0 {
                    if std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock {
                        dead = true;
                    }
                    break;
                }
                if r == 0 {
                    dead = dead || pfd.revents & libc::POLLHUP != 0;
                    break;
                }
                for ev in buf[..r as usize].chunks_exact(ev_size) {
                    // struct input_event ends with: u16 type, u16 code, i32 value.
                    let ty = u16::from_ne_bytes([ev[ev_size - 8], ev[ev_size - 7]]);
                    active |= is_owner_event(ty);
                }
            }
            if active {
                last.fetch_max(now_secs(), Ordering::Relaxed);
            }
            if dead {
                gone.push(i);
            }
        }
        for i in gone.into_iter().rev() {
            let (p, _) = open.remove(i);
            tracing::info!(dev = %p.display(), "input device gone");
        }
        count.store(open.len() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_file_round_trips_and_rejects_garbage() {
        assert_eq!(Override::parse("active\n"), Ok(Override::Active));
        assert_eq!(Override::parse("idle 100"), Ok(Override::IdleSince(100)));
        assert_eq!(
            Override::parse(&Override::IdleSince(7).render()),
            Ok(Override::IdleSince(7))
        );
        for bad in ["", "idle", "idle x", "busy", "active now", "idle 1 2"] {
            assert!(Override::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(Override::IdleSince(100).idle_secs(160), 60);
        assert_eq!(Override::Active.idle_secs(160), 0);
    }

    #[test]
    fn patterns() {
        assert_eq!(
            split_pattern("/dev/input/event*").unwrap(),
            (PathBuf::from("/dev/input"), "event".into())
        );
        assert!(split_pattern("/dev/input/event").is_err());
        assert!(split_pattern("/dev/*/event*").is_err());
    }

    #[test]
    fn without_devices_idle_since_start_and_override_wins() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("owner");
        let m = OwnerMonitor::start(
            file.clone(),
            Some(&format!("{}/event*", d.path().display())),
        )
        .unwrap();
        let (idle, src) = m.idle_secs();
        assert!(idle <= 1 && src.contains("no input device"), "{idle} {src}");
        write_override(&file, Override::IdleSince(now_secs() - 500)).unwrap();
        let (idle, src) = m.idle_secs();
        assert!(
            (500..=501).contains(&idle) && src == "override file",
            "{idle} {src}"
        );
        write_override(&file, Override::Active).unwrap();
        assert_eq!(m.idle_secs().0, 0);
        std::fs::write(&file, "garbage").unwrap();
        assert!(m.idle_secs().0 <= 1, "a bad file must be ignored");
    }

    /// A FIFO standing in for an event device: key events count, sync events do not.
    #[test]
    fn events_on_a_device_mark_the_owner_active() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("event0");
        let c = std::ffi::CString::new(dev.to_str().unwrap()).unwrap();
        // SAFETY: valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let m = OwnerMonitor::start(
            d.path().join("none"),
            Some(&format!("{}/event*", d.path().display())),
        )
        .unwrap();
        // Keep a writer open so the reader does not see hangups.
        let mut w = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while m.devices() == 0 {
            assert!(std::time::Instant::now() < deadline, "device never watched");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Pretend wispd started long ago so activity is visible as a drop in idle time.
        m.last_input.store(now_secs() - 1000, Ordering::Relaxed);
        let ev = |ty: u16| {
            let mut e = vec![0u8; std::mem::size_of::<libc::input_event>()];
            let n = e.len();
            e[n - 8..n - 6].copy_from_slice(&ty.to_ne_bytes());
            e
        };
        use std::io::Write;
        w.write_all(&ev(0)).unwrap(); // EV_SYN
        std::thread::sleep(Duration::from_millis(300));
        assert!(m.idle_secs().0 >= 999, "a sync event counted as the owner");
        w.write_all(&ev(1)).unwrap(); // EV_KEY
        while m.idle_secs().0 > 1 {
            assert!(std::time::Instant::now() < deadline, "key event not seen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
