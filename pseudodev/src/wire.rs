//! The local protocol between a device server and its host's wispd (docs/pseudodev.md).
//!
//! Over a Unix stream socket (by default the abstract name `@wisp-pdev`, which is private
//! to the host's network namespace), each message is one line of JSON (an object, at most
//! [`MAX_HEAD`] bytes) followed by exactly `len` raw bytes of payload (none when `len` is
//! absent or 0). Absent fields are 0 or empty.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, Read, Write};

/// Longest header line.
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest payload of one message.
pub const MAX_DATA: usize = 4 << 20;
/// The socket wispd listens on for device servers unless told otherwise (abstract name).
pub const DEFAULT_SOCKET: &str = "@wisp-pdev";
/// The environment variable that names another socket (a path, or `@name` for an
/// abstract one).
pub const SOCKET_ENV: &str = "WISP_PDEV_SOCKET";

fn z<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// One message, either way. `op` says which (see docs/pseudodev.md).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Frame {
    #[serde(skip_serializing_if = "z")]
    pub op: String,
    #[serde(skip_serializing_if = "z")]
    pub id: u64,
    #[serde(skip_serializing_if = "z")]
    pub dev: u64,
    #[serde(skip_serializing_if = "z")]
    pub open: u64,
    #[serde(skip_serializing_if = "z")]
    pub path: String,
    #[serde(skip_serializing_if = "z")]
    pub mode: u32,
    #[serde(skip_serializing_if = "z")]
    pub host: String,
    #[serde(skip_serializing_if = "z")]
    pub pid: u32,
    #[serde(skip_serializing_if = "z")]
    pub uid: u32,
    #[serde(skip_serializing_if = "z")]
    pub gid: u32,
    #[serde(skip_serializing_if = "z")]
    pub flags: i32,
    #[serde(skip_serializing_if = "z")]
    pub size: u32,
    #[serde(skip_serializing_if = "z")]
    pub cmd: u32,
    #[serde(skip_serializing_if = "z")]
    pub out_size: u32,
    #[serde(skip_serializing_if = "z")]
    pub result: i32,
    #[serde(skip_serializing_if = "z")]
    pub events: u32,
    #[serde(skip_serializing_if = "z")]
    pub errno: i32,
    #[serde(skip_serializing_if = "z")]
    pub msg: String,
    #[serde(skip_serializing_if = "z")]
    pub len: usize,
    /// The payload (`len` bytes after the header line).
    #[serde(skip)]
    pub data: Vec<u8>,
}

impl Frame {
    pub fn op(op: &str) -> Self {
        Frame {
            op: op.into(),
            ..Frame::default()
        }
    }

    pub fn with_data(mut self, data: Vec<u8>) -> Self {
        self.len = data.len();
        self.data = data;
        self
    }
}

fn bad(m: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, m.into())
}

/// Read one message; `None` at a clean end of stream.
pub fn read_frame(r: &mut impl BufRead) -> std::io::Result<Option<Frame>> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_HEAD as u64)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(bad(format!(
            "pseudo-device message header longer than {MAX_HEAD} bytes or cut short"
        )));
    }
    let mut f: Frame = serde_json::from_slice(&line)
        .map_err(|e| bad(format!("pseudo-device message is not a JSON object: {e}")))?;
    if f.len > MAX_DATA {
        return Err(bad(format!(
            "pseudo-device message payload of {} bytes exceeds {MAX_DATA}",
            f.len
        )));
    }
    f.data = vec![0; f.len];
    r.read_exact(&mut f.data)?;
    Ok(Some(f))
}

/// Write one message (one write of header and payload).
pub fn write_frame(w: &mut impl Write, f: &Frame) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(f).map_err(|e| bad(e.to_string()))?;
    out.push(b'\n');
    out.extend_from_slice(&f.data[..f.len.min(f.data.len())]);
    w.write_all(&out)?;
    w.flush()
}

/// The socket address device servers reach wispd at: `$WISP_PDEV_SOCKET` or the default.
pub fn socket_name() -> String {
    std::env::var(SOCKET_ENV).unwrap_or_else(|_| DEFAULT_SOCKET.into())
}

/// A Unix socket address from a name: `@name` is abstract, anything else a path.
pub fn socket_addr(name: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    match name.strip_prefix('@') {
        Some(a) => std::os::unix::net::SocketAddr::from_abstract_name(a.as_bytes()),
        None => std::os::unix::net::SocketAddr::from_pathname(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_input_is_refused() {
        let f = Frame {
            id: 7,
            size: 3,
            ..Frame::op("reply")
        }
        .with_data(b"a\nb".to_vec());
        let mut buf = Vec::new();
        write_frame(&mut buf, &f).unwrap();
        assert!(buf.starts_with(br#"{"op":"reply","id":7,"size":3,"len":3}"#));
        let mut r = std::io::BufReader::new(&buf[..]);
        assert_eq!(read_frame(&mut r).unwrap(), Some(f));
        assert_eq!(read_frame(&mut r).unwrap(), None);
        let e = read_frame(&mut std::io::BufReader::new(&b"nope\n"[..])).unwrap_err();
        assert!(e.to_string().contains("not a JSON object"), "{e}");
        let big = format!("{{\"len\":{}}}\n", MAX_DATA + 1);
        let e = read_frame(&mut std::io::BufReader::new(big.as_bytes())).unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
    }
}
