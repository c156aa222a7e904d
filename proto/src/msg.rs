//! Messages carried in frames after the handshake.
//!
//! Every frame holds one postcard-encoded [`Message`]. Calls flow client -> server and
//! callbacks server -> client over the same connection; each carries an id that its reply
//! repeats, so many calls can be in flight at once in both directions.
//! See docs/protocol.md for the meaning of each request.

use serde::{Deserialize, Serialize};

/// Inode number on a file server. 1 is the root of the domain.
pub type Ino = u64;
pub const ROOT_INO: Ino = 1;

/// One frame's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Message {
    Call {
        id: u64,
        req: Request,
    },
    Reply {
        id: u64,
        resp: Result<Response, WireError>,
    },
    Callback {
        id: u64,
        cb: Callback,
    },
    CallbackReply {
        id: u64,
        resp: Result<(), WireError>,
    },
}

/// An error sent over the wire: a POSIX errno and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg} (errno {errno})")]
pub struct WireError {
    pub errno: i32,
    pub msg: String,
}

impl WireError {
    pub fn new(errno: i32, msg: impl Into<String>) -> Self {
        WireError {
            errno,
            msg: msg.into(),
        }
    }
}

/// Identity of the process making a file system request, as the kernel gave it to FUSE,
/// plus its supplementary groups (from `/proc/PID/status`). The file server checks
/// permissions against it (after squashing root from hosts it does not trust for root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cred {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// Supplementary groups (at most [`MAX_GROUPS`]; the server refuses more).
    pub groups: Vec<u32>,
}

/// Most supplementary groups a [`Cred`] may carry (Linux's NGROUPS_MAX).
pub const MAX_GROUPS: usize = 65536;

impl Cred {
    pub const ROOT: Cred = Cred {
        uid: 0,
        gid: 0,
        pid: 0,
        groups: Vec::new(),
    };

    /// Whether `gid` is the primary group or one of the supplementary groups.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// File type, as in `st_mode & S_IFMT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
    /// A cluster pipe (pseudodev): FIFO semantics between processes on any hosts. Shown to
    /// the kernel as a regular file opened in direct, non-seekable mode.
    Pipe,
}

/// A point in time: seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Time {
    pub secs: i64,
    pub nsecs: u32,
}

impl Time {
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Time {
            secs: d.as_secs() as i64,
            nsecs: d.subsec_nanos(),
        }
    }
}

/// Attributes of an inode (the fields of `struct stat`), plus the data version that the
/// consistency protocol compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    /// Bytes actually allocated on the server (sparse files report less than `size`).
    pub blocks: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    /// Bumped by every open for writing (Sprite's version number).
    pub version: u64,
}

/// A time to set: a given time, or the server's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetTime {
    Now,
    At(Time),
}

/// Attribute changes for `SetAttr`; `None` leaves a field alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttrs {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    /// Cookie to pass as `offset` to continue after this entry.
    pub cookie: u64,
    pub attr: Attr,
}

/// Open mode, as far as the server cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenMode {
    pub read: bool,
    pub write: bool,
    pub truncate: bool,
    /// O_NONBLOCK (matters for cluster pipes).
    pub nonblock: bool,
}

/// Client -> server requests. Names are raw bytes (Unix names need not be UTF-8).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Liveness and round-trip probe.
    Ping,
    Lookup {
        cred: Cred,
        parent: Ino,
        name: Vec<u8>,
    },
    GetAttr {
        ino: Ino,
    },
    SetAttr {
        cred: Cred,
        ino: Ino,
        set: SetAttrs,
    },
    ReadLink {
        ino: Ino,
    },
    MkNod {
        cred: Cred,
        parent: Ino,
        name: Vec<u8>,
        mode: u32,
        rdev: u32,
    },
    Mkdir {
        cred: Cred,
        parent: Ino,
        name: Vec<u8>,
        mode: u32,
    },
    /// Create a regular file; with `excl` an existing name is EEXIST (O_EXCL).
    Create {
        cred: Cred,
        parent: Ino,
        name: Vec<u8>,
        mode: u32,
        excl: bool,
        mode_open: OpenMode,
    },
    Symlink {
        cred: Cred,
        parent: Ino,
        name: Vec<u8>,
        target: Vec<u8>,
    },
    Link {
        cred: Cred,
        ino: Ino,
        new_parent: Ino,
        new_name: Vec<u8>,
    },
    Unlink {
        cred: Cred,
        parent: Ino,
        name: Vec<u8>,
    },
    Rmdir {
        cred: Cred,
        parent: Ino,
        name: Vec<u8>,
    },
    /// `flags` are renameat2 flags (RENAME_NOREPLACE, RENAME_EXCHANGE).
    Rename {
        cred: Cred,
        parent: Ino,
        name: Vec<u8>,
        new_parent: Ino,
        new_name: Vec<u8>,
        flags: u32,
    },
    /// Register an open with the server (consistency tracking); returns current attributes.
    Open {
        cred: Cred,
        ino: Ino,
        mode: OpenMode,
    },
    /// The matching close of an `Open` (or `Create`).
    Close {
        ino: Ino,
        mode: OpenMode,
    },
    Read {
        cred: Cred,
        ino: Ino,
        offset: u64,
        size: u32,
        nonblock: bool,
    },
    /// With `append`, the data goes at the server's end of file and `offset` is ignored.
    Write {
        cred: Cred,
        ino: Ino,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        append: bool,
        nonblock: bool,
    },
    /// A blocking open of a cluster pipe whose `Open` answered EAGAIN ("registered, peer
    /// not there yet") waits for the peer with this, as often as needed.
    PipeAwait {
        ino: Ino,
        writer: bool,
    },
    /// Make the file's data and metadata durable on the server's disk.
    Fsync {
        ino: Ino,
    },
    /// Entries after cookie `offset` (0 = from the start), at most `max` of them.
    ReadDir {
        cred: Cred,
        ino: Ino,
        offset: u64,
        max: u32,
    },
    StatFs,
    SetXattr {
        cred: Cred,
        ino: Ino,
        name: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        flags: i32,
    },
    GetXattr {
        cred: Cred,
        ino: Ino,
        name: Vec<u8>,
    },
    ListXattr {
        cred: Cred,
        ino: Ino,
    },
    RemoveXattr {
        cred: Cred,
        ino: Ino,
        name: Vec<u8>,
    },
    /// `mode` as fallocate(2): 0 or FALLOC_FL_KEEP_SIZE / PUNCH_HOLE|KEEP_SIZE.
    Fallocate {
        cred: Cred,
        ino: Ino,
        offset: u64,
        length: u64,
        mode: i32,
    },
    /// Server-side byte statistics (for tests and `wisp status`).
    Stats,
    /// A request for the cluster registry (naming crate); the payload is that crate's own
    /// postcard-encoded message, opaque to this crate.
    Naming(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Agent (wispd): start a job on this host.
    Exec(ExecSpec),
    /// Agent: wait (bounded; EAGAIN means ask again) for a job to end.
    JobWait {
        job: u64,
    },
    /// Agent: deliver a signal to a job: every process in its sandbox (like a terminal's
    /// process-group signal).
    JobSignal {
        job: u64,
        signal: i32,
        /// The uid asking, as its host asserts it: only the job's owner or root may signal
        /// a job (EPERM otherwise).
        uid: u32,
    },
    /// Agent: the jobs running on this host.
    JobList,
    /// Agent (source): migrate a running job to the agent at `to_addr`. The source freezes
    /// the job, writes its image and pages under `/wisp/.swap/<job>.<nonce>/` (one directory per move), asks the target to
    /// rebuild it, and only then kills its frozen copy; if anything fails it resumes it.
    MigrateOut {
        job: u64,
        to_host: String,
        to_addr: String,
        mode: MigrateMode,
    },
    /// Agent (target): rebuild a job from the image directory `dir` (in the namespace);
    /// with `lazy`, it runs before its memory arrives and faults pages in from the swap file.
    MigrateIn {
        job: u64,
        dir: Vec<u8>,
        uid: u32,
        home: String,
        argv0: String,
        lazy: bool,
    },
    /// Agent: CPU time, memory and state of the jobs running here (`wisp ps`).
    JobStats,
    /// Agent: migrate every foreign job away now, as if the owner had come back
    /// (`wisp evict HOST`); answers when every move is over.
    Evict {
        reason: String,
    },
}

/// Everything a host needs to run a command as if it ran on the submitting host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecSpec {
    /// Cluster-wide job id.
    pub job: u64,
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Working directory; must be inside the cluster namespace.
    pub cwd: Vec<u8>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub umask: u32,
    /// Cluster pipes (paths in the namespace) to connect as fds 0, 1 and 2.
    pub stdin: Vec<u8>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The submitting (home) host.
    pub home: String,
}

/// How a migration moves memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum MigrateMode {
    /// Freeze, write every page, rebuild with every page: simplest, frozen the longest.
    #[default]
    Eager,
    /// Freeze, write every page; the target runs at once and demand-pages the swap file.
    Lazy,
    /// Copy pages while the job runs (rounds until the dirty set stops shrinking), then a
    /// short freeze for the rest; the target runs at once and demand-pages.
    PreCopy,
}

/// A job as an agent reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobInfo {
    pub job: u64,
    pub pid: u32,
    pub uid: u32,
    pub home: String,
    pub argv0: String,
    pub running: bool,
}

/// Resource use of a job on its current host, summed over every process of its sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct JobStat {
    pub job: u64,
    pub argv0: String,
    /// User + system CPU time since the job (re)started on this host.
    pub cpu_ms: u64,
    /// Resident memory.
    pub rss_kb: u64,
    pub processes: u32,
    /// Stopped because it could not migrate away from an evicted host.
    pub suspended: bool,
}

/// What one eviction pass did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct EvictReport {
    /// Jobs moved: (job, host it went to, ms frozen, ms from the decision to running there).
    pub moved: Vec<(u64, String, u64, u64)>,
    /// Jobs that could not move and were stopped (SIGSTOP) here: (job, why).
    pub suspended: Vec<(u64, String)>,
    /// Jobs that could not move and still run here: (job, why).
    pub stayed: Vec<(u64, String)>,
    /// From the decision to the last job gone.
    pub total_ms: u64,
}

/// Server -> client replies, one variant per kind of answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Pong,
    Attr(Attr),
    /// A new or looked-up entry.
    Entry(Attr),
    /// An open (or create) was registered. `cache` is false while the file is write-shared
    /// with another host: the client must then bypass its caches for this open (Sprite's
    /// concurrent write-sharing).
    Opened {
        attr: Attr,
        cache: bool,
    },
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    Written {
        size: u32,
        attr: Attr,
    },
    Entries(Vec<DirEntry>),
    StatFs {
        blocks: u64,
        bfree: u64,
        bavail: u64,
        files: u64,
        ffree: u64,
        bsize: u32,
        namelen: u32,
    },
    Xattr(#[serde(with = "serde_bytes")] Vec<u8>),
    Ok,
    Stats(ServerStats),
    /// The naming crate's reply to a [`Request::Naming`], opaque here.
    Naming(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A job was started with this local pid.
    Started {
        pid: u32,
    },
    /// A job ended: exit code, or the signal that killed it (then `code` is 128 + signal).
    Exited {
        code: i32,
        signal: i32,
    },
    Jobs(Vec<JobInfo>),
    /// The job left this host for `host` (agent at `addr`): ask there.
    Moved {
        host: String,
        addr: String,
    },
    /// A migration finished: the job's pid on the target, how long the job was stopped
    /// (from the freeze to running on the target), bytes of state moved, and the total.
    Migrated {
        pid: u32,
        frozen_ms: u64,
        bytes: u64,
        total_ms: u64,
    },
    JobStats(Vec<JobStat>),
    Evicted(EvictReport),
}

/// Counters a server keeps since it started.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerStats {
    /// File system requests (registry requests are not counted here).
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub callbacks: u64,
    pub clients: u64,
}

/// Server -> client callbacks (the consistency protocol).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Callback {
    /// Drop cached data and attributes of an inode.
    InvalidateInode { ino: Ino },
    /// Drop a cached name in a directory.
    InvalidateEntry { parent: Ino, name: Vec<u8> },
    /// Write back the dirty (delayed-write) blocks of an inode now, keeping the cache:
    /// another client is about to look at the file (sequential write-sharing).
    WriteBack { ino: Ino },
}

/// The extended attribute that turns an empty regular file into a cluster pipe
/// (`wisp mkpipe` sets it).
pub const PIPE_XATTR: &[u8] = b"user.wisp.pipe";

/// Largest name component, as on ext4.
pub const NAME_MAX: usize = 255;
