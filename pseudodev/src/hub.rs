//! The host side of pseudo-devices (run by wispd): device servers on this host attach over
//! the local socket; operations from callers on any host arrive (through the caller's
//! wispd, straight to this one) and are handed to the device, with the caller's identity.
//!
//! A blocking read or write that the device answers EAGAIN waits here, without polling,
//! for the device to announce readiness, at most until the caller's deadline (then EAGAIN
//! again, and the caller's wispd asks again). When a device server's connection ends, every
//! waiting and later request gets ENXIO at once.

use crate::device::Caller;
use crate::wire::{read_frame, socket_addr, write_frame, Frame};
use std::collections::HashMap;
use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Longest wait for a device server to answer one request before the caller gets EIO.
pub const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// An errno with a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg} (errno {errno})")]
pub struct HubError {
    pub errno: i32,
    pub msg: String,
}

fn herr(errno: i32, msg: impl Into<String>) -> HubError {
    HubError {
        errno,
        msg: msg.into(),
    }
}

/// Sets the attachment xattr on a path in the mount (wispd passes the real setxattr).
pub type Marker = Box<dyn Fn(&Path, &[u8]) -> std::io::Result<()> + Send + Sync>;

struct DevState {
    events: u32,
    gen: u64,
    dead: bool,
}

struct Dev {
    path: PathBuf,
    w: Mutex<UnixStream>,
    pending: Mutex<HashMap<u64, mpsc::Sender<Frame>>>,
    st: Mutex<DevState>,
    cv: Condvar,
}

impl Dev {
    fn gone(&self) -> HubError {
        herr(
            libc::ENXIO,
            format!(
                "the server of pseudo-device {} has exited",
                self.path.display()
            ),
        )
    }

    fn die(&self) {
        self.st.lock().unwrap().dead = true;
        self.pending.lock().unwrap().clear(); // waiting callers see the channel close
        self.cv.notify_all();
    }

    fn gen(&self) -> u64 {
        self.st.lock().unwrap().gen
    }

    /// Wait until a readiness announcement after `gen0` includes one of `events`; false at
    /// the deadline.
    fn wait_ready(&self, mut gen0: u64, events: u32, deadline: Instant) -> Result<bool, HubError> {
        let mut g = self.st.lock().unwrap();
        loop {
            if g.dead {
                return Err(self.gone());
            }
            if g.gen != gen0 {
                if g.events & events != 0 {
                    return Ok(true);
                }
                gen0 = g.gen;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            g = self.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }
}

struct Inner {
    mount: PathBuf,
    advertise: String,
    marker: Marker,
    devs: Mutex<HashMap<u64, Arc<Dev>>>,
    next_dev: AtomicU64,
    next_id: AtomicU64,
}

/// The pseudo-devices attached on this host.
#[derive(Clone)]
pub struct Hub(Arc<Inner>);

impl Hub {
    /// Listen on `socket` (a path, or `@name` for an abstract socket) for device servers
    /// that attach to paths under `mount`; callers reach this host at `advertise`.
    pub fn listen(
        socket: &str,
        mount: &Path,
        advertise: &str,
        marker: Marker,
    ) -> std::io::Result<Hub> {
        if !socket.starts_with('@') {
            let _ = std::fs::remove_file(socket);
        }
        let l = UnixListener::bind_addr(&socket_addr(socket)?)?;
        // Device numbers differ across restarts of wispd, so a stale attachment is refused.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        let hub = Hub(Arc::new(Inner {
            mount: mount.into(),
            advertise: advertise.into(),
            marker,
            devs: Mutex::new(HashMap::new()),
            next_dev: AtomicU64::new(seed << 8),
            next_id: AtomicU64::new(1),
        }));
        let h = hub.clone();
        std::thread::Builder::new()
            .name("wisp-pdev-accept".into())
            .spawn(move || {
                for s in l.incoming().flatten() {
                    let h = h.clone();
                    let _ = std::thread::Builder::new()
                        .name("wisp-pdev".into())
                        .spawn(move || h.connection(s));
                }
            })?;
        Ok(hub)
    }

    /// Devices attached now.
    pub fn attached(&self) -> usize {
        self.0.devs.lock().unwrap().len()
    }

    fn check_path(&self, path: &str) -> Result<PathBuf, HubError> {
        let p = Path::new(path);
        if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(herr(
                libc::EINVAL,
                format!("{path:?} must be an absolute path without '..'"),
            ));
        }
        if !p.starts_with(&self.0.mount) || p == self.0.mount {
            return Err(herr(
                libc::EXDEV,
                format!("{path} is not inside {}", self.0.mount.display()),
            ));
        }
        Ok(p.into())
    }

    fn attach(&self, f: &Frame, uid: u32, gid: u32) -> Result<(PathBuf, u64), HubError> {
        use std::os::unix::fs::MetadataExt;
        let path = self.check_path(&f.path)?;
        let io = |what: &str, e: std::io::Error| {
            herr(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("cannot {what} {}: {e}", path.display()),
            )
        };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(if f.mode == 0 { 0o666 } else { f.mode & 0o777 })
                    .open(&path)
                    .map_err(|e| io("create", e))?;
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .map_err(|e| io("give the new device to its server's user", e))?;
                std::fs::metadata(&path).map_err(|e| io("stat", e))?
            }
            Err(e) => return Err(io("stat", e)),
        };
        if uid != 0 && meta.uid() != uid {
            return Err(herr(
                libc::EACCES,
                format!(
                    "{} belongs to uid {}, not to the device server's uid {uid}",
                    path.display(),
                    meta.uid()
                ),
            ));
        }
        if !meta.is_file() {
            return Err(herr(
                libc::EINVAL,
                format!("{} is not a regular file", path.display()),
            ));
        }
        let dev = self.0.next_dev.fetch_add(1, Ordering::Relaxed);
        let val = format!("{} {dev}", self.0.advertise);
        (self.0.marker)(&path, val.as_bytes()).map_err(|e| io("attach a device to", e))?;
        Ok((path, dev))
    }

    fn connection(&self, s: UnixStream) {
        let (uid, gid) = peer_cred(&s).unwrap_or((u32::MAX, u32::MAX));
        let Ok(w) = s.try_clone() else { return };
        let mut r = BufReader::new(s);
        let Ok(Some(f)) = read_frame(&mut r) else {
            return;
        };
        let mut w = w;
        let attached = if f.op != "attach" {
            Err(herr(libc::EINVAL, "the first message must be \"attach\""))
        } else {
            self.attach(&f, uid, gid)
        };
        let (path, id) = match attached {
            Ok(a) => a,
            Err(e) => {
                let _ = write_frame(
                    &mut w,
                    &Frame {
                        errno: e.errno,
                        msg: e.msg,
                        ..Frame::op("error")
                    },
                );
                return;
            }
        };
        let Ok(w2) = w.try_clone() else { return };
        let dev = Arc::new(Dev {
            path: path.clone(),
            w: Mutex::new(w2),
            pending: Mutex::new(HashMap::new()),
            st: Mutex::new(DevState {
                events: (libc::POLLIN | libc::POLLOUT) as u32,
                gen: 0,
                dead: false,
            }),
            cv: Condvar::new(),
        });
        self.0.devs.lock().unwrap().insert(id, dev.clone());
        let ok = write_frame(
            &mut *dev.w.lock().unwrap(),
            &Frame {
                dev: id,
                path: path.to_string_lossy().into_owned(),
                ..Frame::op("attached")
            },
        );
        if ok.is_ok() {
            // Answers and readiness, until the device server goes.
            while let Ok(Some(f)) = read_frame(&mut r) {
                match f.op.as_str() {
                    "ready" => {
                        let mut g = dev.st.lock().unwrap();
                        g.events = f.events;
                        g.gen += 1;
                        dev.cv.notify_all();
                    }
                    _ => {
                        if let Some(tx) = dev.pending.lock().unwrap().remove(&f.id) {
                            let _ = tx.send(f);
                        }
                    }
                }
            }
        }
        self.0.devs.lock().unwrap().remove(&id);
        dev.die();
        let _ = w.shutdown(std::net::Shutdown::Both);
    }

    fn dev(&self, id: u64) -> Result<Arc<Dev>, HubError> {
        self.0
            .devs
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .ok_or_else(|| {
                herr(
                    libc::ENXIO,
                    format!("pseudo-device {id} is not attached here (its server exited)"),
                )
            })
    }

    /// Send one request and wait for the device's answer.
    fn ask(&self, dev: &Dev, mut f: Frame, who: &Caller) -> Result<Frame, HubError> {
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        f.id = id;
        f.host = who.host.clone();
        f.pid = who.pid;
        f.uid = who.uid;
        f.gid = who.gid;
        let (tx, rx) = mpsc::channel();
        {
            // Under the pending lock: `die` marks the device dead before it clears it.
            let mut p = dev.pending.lock().unwrap();
            if dev.st.lock().unwrap().dead {
                return Err(dev.gone());
            }
            p.insert(id, tx);
        }
        if write_frame(&mut *dev.w.lock().unwrap(), &f).is_err() {
            dev.pending.lock().unwrap().remove(&id);
            return Err(dev.gone());
        }
        match rx.recv_timeout(ANSWER_WAIT) {
            Ok(a) if a.errno != 0 => Err(herr(
                a.errno,
                format!(
                    "pseudo-device {} answered errno {}",
                    dev.path.display(),
                    a.errno
                ),
            )),
            Ok(a) => Ok(a),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(dev.gone()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                dev.pending.lock().unwrap().remove(&id);
                Err(herr(
                    libc::EIO,
                    format!(
                        "the server of pseudo-device {} did not answer within {} s",
                        dev.path.display(),
                        ANSWER_WAIT.as_secs()
                    ),
                ))
            }
        }
    }

    /// An operation the device may answer EAGAIN; unless `nonblock`, wait for readiness
    /// `events` and ask again, until `deadline` (then EAGAIN).
    fn blocking(
        &self,
        id: u64,
        f: Frame,
        who: &Caller,
        nonblock: bool,
        events: u32,
        deadline: Instant,
    ) -> Result<Frame, HubError> {
        let dev = self.dev(id)?;
        loop {
            let g0 = dev.gen();
            match self.ask(&dev, f.clone(), who) {
                Err(e) if e.errno == libc::EAGAIN && !nonblock => {
                    if !dev.wait_ready(g0, events, deadline)? {
                        return Err(e);
                    }
                }
                other => return other,
            }
        }
    }

    pub fn open(&self, id: u64, who: &Caller, flags: i32) -> Result<u64, HubError> {
        let dev = self.dev(id)?;
        let open = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        self.ask(
            &dev,
            Frame {
                open,
                flags,
                ..Frame::op("open")
            },
            who,
        )?;
        Ok(open)
    }

    pub fn read(
        &self,
        id: u64,
        open: u64,
        who: &Caller,
        size: u32,
        nonblock: bool,
        deadline: Instant,
    ) -> Result<Vec<u8>, HubError> {
        let f = Frame {
            open,
            size,
            ..Frame::op("read")
        };
        Ok(self
            .blocking(id, f, who, nonblock, libc::POLLIN as u32, deadline)?
            .data)
    }

    pub fn write(
        &self,
        id: u64,
        open: u64,
        who: &Caller,
        data: Vec<u8>,
        nonblock: bool,
        deadline: Instant,
    ) -> Result<u32, HubError> {
        let f = Frame {
            open,
            ..Frame::op("write")
        }
        .with_data(data);
        Ok(self
            .blocking(id, f, who, nonblock, libc::POLLOUT as u32, deadline)?
            .size)
    }

    pub fn ioctl(
        &self,
        id: u64,
        open: u64,
        who: &Caller,
        cmd: u32,
        data: Vec<u8>,
        out_size: u32,
    ) -> Result<(i32, Vec<u8>), HubError> {
        let dev = self.dev(id)?;
        let f = Frame {
            open,
            cmd,
            out_size,
            ..Frame::op("ioctl")
        }
        .with_data(data);
        let a = self.ask(&dev, f, who)?;
        Ok((a.result, a.data))
    }

    /// The readiness bits the device last announced; with `wait`, wait (until `deadline`)
    /// for one of `events`. A device whose server is gone is POLLERR|POLLHUP.
    pub fn poll(&self, id: u64, events: u32, wait: bool, deadline: Instant) -> u32 {
        let dead = (libc::POLLERR | libc::POLLHUP) as u32;
        let Ok(dev) = self.dev(id) else { return dead };
        let g0 = {
            let g = dev.st.lock().unwrap();
            if g.dead {
                return dead;
            }
            if !wait || g.events & events != 0 {
                return g.events;
            }
            g.gen
        };
        match dev.wait_ready(g0, events, deadline) {
            Ok(_) => dev.st.lock().unwrap().events,
            Err(_) => dead,
        }
    }

    /// Tell the device an open ended (not answered).
    pub fn close(&self, id: u64, open: u64, who: &Caller) {
        if let Ok(dev) = self.dev(id) {
            let f = Frame {
                open,
                host: who.host.clone(),
                pid: who.pid,
                uid: who.uid,
                gid: who.gid,
                ..Frame::op("close")
            };
            let _ = write_frame(&mut *dev.w.lock().unwrap(), &f);
        }
    }
}

fn peer_cred(s: &UnixStream) -> Option<(u32, u32)> {
    use std::os::fd::AsRawFd;
    let mut c = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `c`, a properly sized ucred.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut c as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some((c.uid, c.gid))
}
