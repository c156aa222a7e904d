//! The library a device server is written with: implement [`Device`] and call [`serve`].
//!
//! ```no_run
//! use std::sync::atomic::{AtomicU64, Ordering};
//! struct Counter(AtomicU64);
//! impl wisp_pseudodev::device::Device for Counter {
//!     fn read(&self, _: u64, _: &wisp_pseudodev::device::Caller, _: usize) -> Result<Vec<u8>, i32> {
//!         Ok(format!("{}\n", self.0.fetch_add(1, Ordering::SeqCst)).into_bytes())
//!     }
//! }
//! wisp_pseudodev::device::serve("/wisp/counter".as_ref(), &Counter(AtomicU64::new(0))).unwrap();
//! ```
//!
//! Handlers must not block: a read with nothing to give answers `Err(EAGAIN)`, and the
//! device announces with [`Notifier::ready`] when it has something (wispd then asks again
//! for a blocked caller, and wakes poll/select/epoll waiters). Until the first
//! announcement a device counts as always readable and writable.

use crate::wire::{read_frame, socket_addr, socket_name, write_frame, Frame};
use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Who made a request: the calling process's host, pid (as that host's FUSE sees it), uid
/// and gid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub host: String,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A pseudo-device. `open` is a number naming one open (unique on the device); errors are
/// errnos, handed to the caller's system call as they are.
pub trait Device: Send + Sync {
    fn open(&self, _open: u64, _who: &Caller, _flags: i32) -> Result<(), i32> {
        Ok(())
    }
    /// At most `size` bytes; an empty answer is end of file.
    fn read(&self, _open: u64, _who: &Caller, _size: usize) -> Result<Vec<u8>, i32> {
        Err(libc::EINVAL)
    }
    /// The bytes taken.
    fn write(&self, _open: u64, _who: &Caller, _data: &[u8]) -> Result<usize, i32> {
        Err(libc::EINVAL)
    }
    /// ioctl(2) `cmd` with the caller's input bytes (as `_IOW` encodes their size); answers
    /// the return value and at most `out_size` output bytes (as `_IOR` encodes).
    fn ioctl(
        &self,
        _open: u64,
        _who: &Caller,
        _cmd: u32,
        _input: &[u8],
        _out_size: u32,
    ) -> Result<(i32, Vec<u8>), i32> {
        Err(libc::ENOTTY)
    }
    fn close(&self, _open: u64, _who: &Caller) {}
}

/// Errors attaching or serving.
#[derive(Debug, thiserror::Error)]
pub enum PdevError {
    #[error("cannot reach wispd's pseudo-device socket {socket} (is wispd running on this host?): {source}")]
    Connect {
        socket: String,
        source: std::io::Error,
    },
    #[error("wispd refused to attach {path}: {msg} (errno {errno})")]
    Refused {
        path: String,
        errno: i32,
        msg: String,
    },
    #[error("connection to wispd failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Announces the device's readiness (poll(2) bits: POLLIN, POLLOUT...) to wispd.
#[derive(Clone)]
pub struct Notifier(Arc<Mutex<UnixStream>>);

impl Notifier {
    pub fn ready(&self, events: u32) -> std::io::Result<()> {
        write_frame(
            &mut *self.0.lock().unwrap(),
            &Frame {
                events,
                ..Frame::op("ready")
            },
        )
    }
}

/// A device attached to a path, not yet serving.
pub struct Attached {
    r: BufReader<UnixStream>,
    w: Arc<Mutex<UnixStream>>,
    /// The device number wispd gave it.
    pub dev: u64,
}

impl Attached {
    /// Attach to `path` (in /wisp; created with mode 0666 if missing, else it must be an
    /// empty regular file or a device, owned by this user) through this host's wispd.
    pub fn attach(path: &Path) -> Result<Self, PdevError> {
        let socket = socket_name();
        let s = socket_addr(&socket)
            .and_then(|a| UnixStream::connect_addr(&a))
            .map_err(|source| PdevError::Connect {
                socket: socket.clone(),
                source,
            })?;
        let w = Arc::new(Mutex::new(s.try_clone()?));
        let mut r = BufReader::new(s);
        let path_s = path.to_string_lossy().into_owned();
        write_frame(
            &mut *w.lock().unwrap(),
            &Frame {
                path: path_s.clone(),
                mode: 0o666,
                ..Frame::op("attach")
            },
        )?;
        match read_frame(&mut r)? {
            Some(f) if f.op == "attached" => Ok(Attached { r, w, dev: f.dev }),
            Some(f) => Err(PdevError::Refused {
                path: path_s,
                errno: f.errno,
                msg: f.msg,
            }),
            None => Err(PdevError::Refused {
                path: path_s,
                errno: libc::EIO,
                msg: "wispd closed the connection".into(),
            }),
        }
    }

    pub fn notifier(&self) -> Notifier {
        Notifier(self.w.clone())
    }

    /// Answer requests until wispd closes the connection (then Ok) or it fails.
    pub fn serve(mut self, dev: &dyn Device) -> Result<(), PdevError> {
        while let Some(f) = read_frame(&mut self.r)? {
            let who = Caller {
                host: f.host.clone(),
                pid: f.pid,
                uid: f.uid,
                gid: f.gid,
            };
            let mut out = Frame {
                id: f.id,
                ..Frame::op("reply")
            };
            let r = match f.op.as_str() {
                "open" => dev.open(f.open, &who, f.flags),
                "read" => dev.read(f.open, &who, f.size as usize).map(|mut d| {
                    d.truncate(f.size as usize);
                    out = std::mem::take(&mut out).with_data(d)
                }),
                "write" => dev.write(f.open, &who, &f.data).map(|n| {
                    out.size = n.min(f.data.len()) as u32;
                }),
                "ioctl" => {
                    dev.ioctl(f.open, &who, f.cmd, &f.data, f.out_size)
                        .map(|(res, mut d)| {
                            d.truncate(f.out_size as usize);
                            out = std::mem::take(&mut out).with_data(d);
                            out.result = res;
                        })
                }
                "close" => {
                    dev.close(f.open, &who);
                    continue;
                }
                _ => Err(libc::ENOSYS),
            };
            if let Err(e) = r {
                out = Frame {
                    id: f.id,
                    errno: if e == 0 { libc::EIO } else { e },
                    ..Frame::op("reply")
                };
            }
            write_frame(&mut *self.w.lock().unwrap(), &out)?;
        }
        Ok(())
    }
}

/// Attach `dev` to `path` and serve it until wispd goes away.
pub fn serve(path: &Path, dev: &dyn Device) -> Result<(), PdevError> {
    Attached::attach(path)?.serve(dev)
}
