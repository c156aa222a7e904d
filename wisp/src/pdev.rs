//! wispd's side of pseudo-devices: the [`Hub`] device servers of this host attach to, and
//! the rpc service on the agent port (7071) that hands `Request::Pdev` calls from other
//! hosts' wispds to it (every other request goes to the job agent, if there is one). Also
//! the example device `wisp pdev counter PATH`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wisp_proto::msg::{PdevCall, PdevCaller, PdevOp, Request, Response, WireError};
use wisp_proto::rpc::{PeerHandle, Service};
use wisp_pseudodev::device::{Caller, Device};
use wisp_pseudodev::hub::{Hub, HubError};

/// How long a blocking pseudo-device read or write waits here before the caller's wispd
/// is answered EAGAIN and asks again.
pub const PDEV_WAIT: Duration = Duration::from_secs(5);

/// Listen for device servers of this host on `socket`; the attachment xattr is set
/// through the mount with setxattr(2).
pub fn start_hub(socket: &str, mount: &std::path::Path, advertise: &str) -> std::io::Result<Hub> {
    Hub::listen(
        socket,
        mount,
        advertise,
        Box::new(|path, value| {
            let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            let name = std::ffi::CString::new(wisp_proto::msg::PDEV_XATTR).expect("no NUL");
            // SAFETY: valid NUL-terminated strings and a buffer of `value.len()` bytes.
            let r = unsafe {
                libc::setxattr(
                    p.as_ptr(),
                    name.as_ptr(),
                    value.as_ptr() as *const libc::c_void,
                    value.len(),
                    0,
                )
            };
            if r == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }),
    )
}

fn wire(e: HubError) -> WireError {
    WireError::new(e.errno, e.msg)
}

fn caller(c: PdevCaller) -> Caller {
    Caller {
        host: c.host,
        pid: c.pid,
        uid: c.uid,
        gid: c.gid,
    }
}

/// Serve one pseudo-device call (on the rpc blocking pool: waits are bounded by
/// [`PDEV_WAIT`]).
pub fn pdev_call(hub: &Hub, c: PdevCall) -> Result<Response, WireError> {
    let who = caller(c.caller);
    let deadline = Instant::now() + PDEV_WAIT;
    Ok(match c.op {
        PdevOp::Open { flags } => Response::PdevOpened {
            open: hub.open(c.dev, &who, flags).map_err(wire)?,
        },
        PdevOp::Read { size, nonblock } => Response::Data(
            hub.read(c.dev, c.open, &who, size, nonblock, deadline)
                .map_err(wire)?,
        ),
        PdevOp::Write { data, nonblock } => {
            let size = hub
                .write(c.dev, c.open, &who, data, nonblock, deadline)
                .map_err(wire)?;
            Response::Written {
                size,
                attr: placeholder_attr(),
            }
        }
        PdevOp::Ioctl {
            cmd,
            data,
            out_size,
        } => {
            let (result, data) = hub
                .ioctl(c.dev, c.open, &who, cmd, data, out_size)
                .map_err(wire)?;
            Response::Ioctl { result, data }
        }
        PdevOp::Poll { events, wait } => Response::Ready(hub.poll(c.dev, events, wait, deadline)),
        PdevOp::Close => {
            hub.close(c.dev, c.open, &who);
            Response::Ok
        }
    })
}

/// `Written` carries attributes for files; a device's are not known here (the caller's
/// wispd ignores them).
fn placeholder_attr() -> wisp_proto::msg::Attr {
    use wisp_proto::msg::{Attr, Kind, Time};
    Attr {
        ino: 0,
        kind: Kind::Device,
        perm: 0,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        size: 0,
        blocks: 0,
        atime: Time::default(),
        mtime: Time::default(),
        ctime: Time::default(),
        version: 0,
    }
}

/// The service on wispd's port: pseudo-device calls to the hub, the rest to the agent.
pub struct HostService<A: Service> {
    pub hub: Hub,
    pub agent: Option<Arc<A>>,
}

impl<A: Service> Service for HostService<A> {
    fn call(&self, peer: &Arc<PeerHandle>, req: Request) -> Result<Response, WireError> {
        match (req, &self.agent) {
            (Request::Pdev(c), _) => pdev_call(&self.hub, c),
            (Request::Ping, None) => Ok(Response::Pong),
            (req, Some(a)) => a.call(peer, req),
            (_, None) => Err(WireError::new(
                libc::EOPNOTSUPP,
                "this host runs no job agent (wispd --no-agent)",
            )),
        }
    }
    fn disconnected(&self, peer: &Arc<PeerHandle>) {
        if let Some(a) = &self.agent {
            a.disconnected(peer)
        }
    }
}

/// The example device: every read of an open gives the next number of a counter, as one
/// line, then end of file (so `cat` prints one number per open).
#[derive(Default)]
pub struct Counter {
    next: AtomicU64,
    given: std::sync::Mutex<std::collections::HashSet<u64>>,
}

impl Device for Counter {
    fn read(&self, open: u64, who: &Caller, _size: usize) -> Result<Vec<u8>, i32> {
        if !self.given.lock().unwrap().insert(open) {
            return Ok(Vec::new());
        }
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        Ok(format!("{n} {} {}\n", who.host, who.uid).into_bytes())
    }
    fn close(&self, open: u64, _who: &Caller) {
        self.given.lock().unwrap().remove(&open);
    }
}
