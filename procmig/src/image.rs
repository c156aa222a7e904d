//! The migration image: what a frozen process is made of, on disk, in two files of one
//! directory (on the cluster this is `/wisp/.swap/<job>/`).
//!
//! # `image.meta` (metadata)
//!
//! ```text
//! offset size  field
//! 0      8     magic  b"WISPPMIG"
//! 8      4     format version, u32 little-endian (currently 5; 5 added process trees)
//! 12     4     reserved, zero
//! 16     8     payload length N, u64 little-endian (at most META_MAX = 64 MiB)
//! 24     32    SHA-256 of the payload
//! 56     N     payload: an rkyv 0.8 archive of [`ImageMeta`], checked with bytecheck
//! ```
//! Loading checks, in this order: the size cap, the magic, the version, the length
//! against the file size, the checksum, the rkyv validation, then semantic checks
//! (sorted, page-aligned, non-overlapping VMAs; page runs inside VMAs and inside the pages
//! file; register and xstate sizes). Each failure is a distinct [`ImageError`] naming
//! the file and the field. The metadata is written last, to a temporary name renamed over
//! `image.meta`, so a directory with an `image.meta` always holds a complete image.
//!
//! Both files are created with mode 0600 in a 0700 directory: they hold process memory.
//!
//! # `pages.img` (the swap file)
//!
//! ```text
//! 0      8     magic b"WISPPAGE"
//! 8      4     version u32 LE (same as image.meta)
//! 12     4     reserved
//! 16     8     image id u64 LE (must equal ImageMeta::image_id)
//! 24..4096     zero
//! 4096   ...   raw page contents, 4096 bytes per page
//! ```
//! The page index is `ImageMeta::page_runs`: each run maps `npages` consecutive pages
//! starting at virtual address `vaddr` to the byte `offset` (page aligned) of this file.
//! Only pages that differ from what a fresh mapping gives are stored: present or swapped
//! pages of anonymous mappings that are not all zero, and private copy-on-write copies of
//! file-backed mappings. Pages are page-aligned in the file so that a lazy restore can
//! answer userfaultfd faults straight from it.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rkyv::{Archive, Deserialize, Serialize};
use sha2::Digest;

use crate::sys::REGS_WORDS;

/// Metadata file name inside an image directory.
pub const META_FILE: &str = "image.meta";
/// Pages ("swap") file name inside an image directory.
pub const PAGES_FILE: &str = "pages.img";
/// Magic of `image.meta`.
pub const META_MAGIC: &[u8; 8] = b"WISPPMIG";
/// Magic of `pages.img`.
pub const PAGES_MAGIC: &[u8; 8] = b"WISPPAGE";
/// Current format version.
pub const VERSION: u32 = 5;
/// Size cap of the metadata payload.
pub const META_MAX: u64 = 64 << 20;
/// Header length of `image.meta`.
pub const META_HEADER: usize = 56;
/// Offset of the first page in `pages.img`.
pub const PAGES_DATA_OFFSET: u64 = 4096;
/// Page size (x86_64).
pub const PAGE: u64 = 4096;

/// Errors reading or writing an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: file is {len} bytes, larger than the cap of {cap} bytes")]
    TooLarge { path: PathBuf, len: u64, cap: u64 },
    #[error("{path}: truncated: {what}")]
    Truncated { path: PathBuf, what: String },
    #[error("{path}: bad magic (not a wisp image file)")]
    BadMagic { path: PathBuf },
    #[error("{path}: unsupported format version {found} (this build reads version {VERSION} only; an image written by another wisp version cannot be restored, dump the process again)")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: checksum mismatch: payload is corrupt")]
    Checksum { path: PathBuf },
    #[error("{path}: metadata failed validation: {detail}")]
    Archive { path: PathBuf, detail: String },
    #[error("{path}: inconsistent image: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("{path}: the image belongs to {owner:?}, not to {want:?}: refusing to restore it")]
    Foreign {
        path: PathBuf,
        owner: String,
        want: String,
    },
    #[error("{path}: image altered or not from this migration: {what}; refusing to restore it")]
    Altered { path: PathBuf, what: String },
    #[error("cannot serialize image metadata: {0}")]
    Serialize(String),
}

type Result<T> = std::result::Result<T, ImageError>;

/// Identity of a file a mapping or descriptor refers to, checked again at restore.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FileId {
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
}

/// What backs a VMA.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum VmaKind {
    /// MAP_PRIVATE | MAP_ANONYMOUS (heap, stack, malloc arenas...).
    AnonPrivate,
    /// MAP_SHARED | MAP_ANONYMOUS (single process: recreated and refilled).
    AnonShared,
    /// MAP_PRIVATE of a file at `offset` (text, data, libraries); dirty pages stored.
    FilePrivate,
    /// MAP_SHARED of a file: the file holds the contents, nothing stored.
    FileShared,
    /// Kernel special mappings (`[vdso]`, `[vvar]`, `[vvar_vclock]`): moved, not stored.
    Special,
    /// `[vsyscall]`: fixed by the kernel, ignored.
    Vsyscall,
}

/// One line of /proc/pid/maps plus what restore needs to recreate it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// PROT_READ | PROT_WRITE | PROT_EXEC bits.
    pub prot: u32,
    pub kind: VmaKind,
    /// Path for file-backed mappings, pseudo name (`[heap]`, `[stack]`, `[vdso]`) otherwise.
    pub name: String,
    pub offset: u64,
    pub file: Option<FileId>,
    pub growsdown: bool,
    /// VM_MAYWRITE ("mw" in smaps): the file was opened for writing (shared mappings).
    pub maywrite: bool,
    /// VM_NORESERVE ("nr"): mapped with MAP_NORESERVE (no commit charge).
    pub noreserve: bool,
}

/// A run of consecutive stored pages.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    pub vaddr: u64,
    pub npages: u64,
    /// Byte offset in `pages.img` (page aligned, >= PAGES_DATA_OFFSET).
    pub offset: u64,
}

/// mm_struct fields restored with PR_SET_MM_MAP.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// Raw /proc/pid/auxv.
    pub auxv: Vec<u8>,
}

/// One signal disposition (kernel `struct sigaction` for rt_sigaction).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigAction {
    pub signo: u32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// sigaltstack state.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

/// Kind of an open file descriptor.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum FdKind {
    /// A regular file reopened by path at `pos`.
    Regular,
    /// An allowed character device (/dev/null, /dev/zero, /dev/urandom, /dev/random, /dev/full).
    CharDev,
    /// A pipe end; reconnected from an inherited descriptor or, on the same host, from
    /// the frozen source's `/proc/<pid>/fd/<fd>.`
    Pipe { ino: u64 },
}

/// One open file descriptor.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FdEntry {
    pub fd: i32,
    pub kind: FdKind,
    pub path: String,
    pub pos: u64,
    /// open(2) flags from fdinfo (O_ACCMODE, O_APPEND, O_NONBLOCK, O_CLOEXEC...).
    pub flags: u32,
    pub file: Option<FileId>,
    /// Open file description id, unique within a (tree) image: descriptors with the same
    /// id shared one open file description (dup, fork) and are restored sharing one again.
    pub desc: u32,
}

/// A pipe held by the job, with the data that was in it (unread) at dump time.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PipeImage {
    /// Inode on the source host (the `pipe:[ino]` of the descriptors).
    pub ino: u64,
    /// Capacity (F_GETPIPE_SZ), restored so that writers block where they did.
    pub size: u32,
    /// Unread bytes, copied without consuming them (tee(2)) so a resumed source loses nothing.
    pub data: Vec<u8>,
    /// Some process outside the job holds an end too: the pipe is reconnected (inherited
    /// descriptor or, on the same host, reopened from the frozen source) instead of being
    /// recreated, and `data` is empty.
    pub external: bool,
}

/// Another process of a process-tree image: its own complete image lives in the
/// subdirectory `dir` of the root image's directory.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// pid in the job's pid namespace.
    pub ns_pid: i32,
    /// Subdirectory name (one path component).
    pub dir: String,
    /// Must equal the member image's `image_id`.
    pub image_id: u64,
}

/// Resource limit.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: u32,
    pub cur: u64,
    pub max: u64,
}

/// Credentials from /proc/pid/status.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Creds {
    /// real, effective, saved, fs
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
}

/// One interval timer (getitimer).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ITimer {
    pub which: i32,
    pub interval_usec: u64,
    pub value_usec: u64,
}

/// rseq registration.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rseq {
    pub addr: u64,
    pub len: u32,
    pub sig: u32,
}

/// Everything about a frozen process except its page contents. The top-level register,
/// signal and rseq fields are the thread-group leader's; other threads are in `threads`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ImageMeta {
    /// Random id shared with the pages file header.
    pub image_id: u64,
    pub created_unix: u64,
    /// Host pid at dump time.
    pub pid: i32,
    /// NSpid line: pid in each pid namespace, outermost first.
    pub ns_pids: Vec<i32>,
    pub hostname: String,
    pub kernel_release: String,
    pub comm: String,
    pub exe: String,
    pub exe_file: Option<FileId>,
    /// user_regs_struct words, with syscall restart already applied (orig_rax = -1).
    pub regs: Vec<u64>,
    /// NT_X86_XSTATE area.
    pub xstate: Vec<u8>,
    pub fs_base: u64,
    pub gs_base: u64,
    pub rseq: Option<Rseq>,
    pub robust_list: u64,
    pub robust_list_len: u64,
    pub clear_child_tid: u64,
    pub vmas: Vec<Vma>,
    pub page_runs: Vec<PageRun>,
    /// Exact size of pages.img.
    pub pages_file_len: u64,
    /// SHA-256 of the source's `[vdso]` bytes: restore requires the same vdso.
    pub vdso_sha256: Vec<u8>,
    pub mm: MmFields,
    pub sigactions: Vec<SigAction>,
    pub sigmask: u64,
    /// Signals pending at dump (thread and shared), re-sent after restore.
    pub pending: Vec<u32>,
    pub altstack: AltStack,
    pub fds: Vec<FdEntry>,
    pub cwd: String,
    pub umask: u32,
    pub rlimits: Vec<Rlimit>,
    pub creds: Creds,
    pub personality: u32,
    pub itimers: Vec<ITimer>,
    /// Human-readable note on how an interrupted syscall was handled.
    pub syscall_note: String,
    /// Threads other than the leader (whose state is the fields above), in tid order.
    pub threads: Vec<ThreadImage>,
    /// PR_SET_NO_NEW_PRIVS was set.
    pub no_new_privs: bool,
    /// Parent, process group and session ids in the innermost pid namespace (0: outside
    /// of it, e.g. the session of the agent that started the sandbox).
    pub ns_ppid: i32,
    pub ns_pgid: i32,
    pub ns_sid: i32,
    /// Process tree (root image only): the other processes of the job's pid namespace
    /// (all but its init), parents before children.
    pub members: Vec<Member>,
    /// Pipes held by the processes of this image (root image only, for the whole tree).
    pub pipes: Vec<PipeImage>,
}

/// Per-thread state of a thread other than the leader.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ThreadImage {
    /// Host tid at dump time.
    pub tid: i32,
    /// tid in the innermost pid namespace.
    pub ns_tid: i32,
    pub comm: String,
    /// user_regs_struct words, restart applied (as `ImageMeta::regs`).
    pub regs: Vec<u64>,
    pub xstate: Vec<u8>,
    pub sigmask: u64,
    /// Signals pending for this thread only.
    pub pending: Vec<u32>,
    pub altstack: AltStack,
    pub rseq: Option<Rseq>,
    pub robust_list: u64,
    pub robust_list_len: u64,
    pub clear_child_tid: u64,
}

impl ImageMeta {
    /// Registers as a `user_regs_struct`.
    pub fn regs(&self) -> Option<crate::sys::Regs> {
        crate::sys::regs_from_words(&self.regs)
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Create an image directory readable by its owner only (it holds process memory).
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

/// Create (truncate) an image file with mode 0600, and make its creation durable at once:
/// a streamed swap file is written while the job already runs on the target, and a file
/// server that restarts must not forget the file (and the directory holding it) while
/// its pages are still being written into it.
pub fn create_private_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(f)
}

/// Write `meta` as `dir/image.meta` atomically (temp file + fsync + rename); returns the
/// SHA-256 of the payload (what the image's tag covers, see [`crate::swap`]).
pub fn write_meta(dir: &Path, meta: &ImageMeta) -> Result<[u8; 32]> {
    let payload = rkyv::to_bytes::<rkyv::rancor::Error>(meta)
        .map_err(|e| ImageError::Serialize(e.to_string()))?;
    if payload.len() as u64 > META_MAX {
        return Err(ImageError::TooLarge {
            path: dir.join(META_FILE),
            len: payload.len() as u64,
            cap: META_MAX,
        });
    }
    let mut header = Vec::with_capacity(META_HEADER);
    header.extend_from_slice(META_MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let digest: [u8; 32] = sha2::Sha256::digest(&payload).into();
    header.extend_from_slice(&digest);
    let tmp = dir.join(format!("{META_FILE}.tmp"));
    let mut f = create_private_file(&tmp)?;
    f.write_all(&header).map_err(io_err(&tmp))?;
    f.write_all(&payload).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    let dst = dir.join(META_FILE);
    std::fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
    Ok(digest)
}

/// Header of `pages.img` for `image_id`, padded to [`PAGES_DATA_OFFSET`].
pub fn pages_header(image_id: u64) -> Vec<u8> {
    let mut h = vec![0u8; PAGES_DATA_OFFSET as usize];
    h[..8].copy_from_slice(PAGES_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&image_id.to_le_bytes());
    h
}

/// Read, verify and validate `dir/image.meta`, and check `dir/pages.img` against it.
pub fn load(dir: &Path) -> Result<ImageMeta> {
    load_with_digest(dir).map(|(m, _)| m)
}

/// [`load`], also returning the SHA-256 of the payload (checked against the header).
pub fn load_with_digest(dir: &Path) -> Result<(ImageMeta, [u8; 32])> {
    let path = dir.join(META_FILE);
    let mut f = File::open(&path).map_err(io_err(&path))?;
    let len = f.metadata().map_err(io_err(&path))?.len();
    if len > META_MAX + META_HEADER as u64 {
        return Err(ImageError::TooLarge {
            path,
            len,
            cap: META_MAX + META_HEADER as u64,
        });
    }
    if len < META_HEADER as u64 {
        return Err(ImageError::Truncated {
            path,
            what: format!("header needs {META_HEADER} bytes, file has {len}"),
        });
    }
    let mut header = [0u8; META_HEADER];
    f.read_exact(&mut header).map_err(io_err(&path))?;
    if &header[..8] != META_MAGIC {
        return Err(ImageError::BadMagic { path });
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != VERSION {
        return Err(ImageError::Version {
            path,
            found: version,
        });
    }
    let mut lenb = [0u8; 8];
    lenb.copy_from_slice(&header[16..24]);
    let plen = u64::from_le_bytes(lenb);
    if plen > META_MAX {
        return Err(ImageError::TooLarge {
            path,
            len: plen,
            cap: META_MAX,
        });
    }
    if plen + META_HEADER as u64 != len {
        return Err(ImageError::Truncated {
            path,
            what: format!(
                "header announces a {plen}-byte payload, file holds {}",
                len - META_HEADER as u64
            ),
        });
    }
    let mut payload = rkyv::util::AlignedVec::<16>::with_capacity(plen as usize);
    payload.resize(plen as usize, 0);
    f.read_exact(&mut payload).map_err(io_err(&path))?;
    if sha2::Sha256::digest(&payload[..]).as_slice() != &header[24..56] {
        return Err(ImageError::Checksum { path });
    }
    let meta = rkyv::from_bytes::<ImageMeta, rkyv::rancor::Error>(&payload).map_err(|e| {
        ImageError::Archive {
            path: path.clone(),
            detail: e.to_string(),
        }
    })?;
    validate(&path, &meta)?;
    check_pages_file(dir, &meta)?;
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&header[24..56]);
    Ok((meta, digest))
}

fn invalid(path: &Path, detail: String) -> ImageError {
    ImageError::Invalid {
        path: path.to_path_buf(),
        detail,
    }
}

/// Semantic checks of a decoded metadata record.
pub fn validate(path: &Path, m: &ImageMeta) -> Result<()> {
    if m.regs.len() != REGS_WORDS {
        return Err(invalid(
            path,
            format!("regs has {} words, expected {REGS_WORDS}", m.regs.len()),
        ));
    }
    if m.xstate.len() < 512 || m.xstate.len() > crate::sys::XSTATE_MAX {
        return Err(invalid(
            path,
            format!(
                "xstate is {} bytes, expected 512..={}",
                m.xstate.len(),
                crate::sys::XSTATE_MAX
            ),
        ));
    }
    let mut prev_end = 0u64;
    for (i, v) in m.vmas.iter().enumerate() {
        if v.start % PAGE != 0 || v.end % PAGE != 0 || v.start >= v.end {
            return Err(invalid(
                path,
                format!(
                    "vma {i} ({:#x}-{:#x}) is empty or not page aligned",
                    v.start, v.end
                ),
            ));
        }
        if v.start < prev_end {
            return Err(invalid(
                path,
                format!(
                    "vma {i} ({:#x}-{:#x}) overlaps or is out of order",
                    v.start, v.end
                ),
            ));
        }
        if v.kind != VmaKind::Vsyscall && v.end > 0x8000_0000_0000 {
            return Err(invalid(
                path,
                format!(
                    "vma {i} ({:#x}-{:#x}) is above the user address space",
                    v.start, v.end
                ),
            ));
        }
        if v.prot & !7 != 0 {
            return Err(invalid(
                path,
                format!("vma {i} has unknown prot bits {:#x}", v.prot),
            ));
        }
        if matches!(v.kind, VmaKind::FilePrivate | VmaKind::FileShared) && !v.name.starts_with('/')
        {
            return Err(invalid(
                path,
                format!(
                    "vma {i} is file-backed but has no absolute path ({:?})",
                    v.name
                ),
            ));
        }
        prev_end = v.end;
    }
    let mut prev = 0u64;
    let mut vi = 0usize;
    for (i, r) in m.page_runs.iter().enumerate() {
        let bytes = r
            .npages
            .checked_mul(PAGE)
            .ok_or_else(|| invalid(path, format!("page run {i}: npages overflows")))?;
        let vend = r
            .vaddr
            .checked_add(bytes)
            .ok_or_else(|| invalid(path, format!("page run {i}: vaddr overflows")))?;
        let fend = r
            .offset
            .checked_add(bytes)
            .ok_or_else(|| invalid(path, format!("page run {i}: offset overflows")))?;
        if r.npages == 0
            || r.vaddr % PAGE != 0
            || r.offset % PAGE != 0
            || r.offset < PAGES_DATA_OFFSET
        {
            return Err(invalid(
                path,
                format!(
                    "page run {i} (vaddr {:#x}, offset {}) is empty or misaligned",
                    r.vaddr, r.offset
                ),
            ));
        }
        if r.vaddr < prev {
            return Err(invalid(
                path,
                format!(
                    "page run {i} (vaddr {:#x}) overlaps or is out of order",
                    r.vaddr
                ),
            ));
        }
        if fend > m.pages_file_len {
            return Err(invalid(
                path,
                format!(
                    "page run {i} ends at byte {fend} beyond the {}-byte pages file",
                    m.pages_file_len
                ),
            ));
        }
        while vi < m.vmas.len() && m.vmas[vi].end <= r.vaddr {
            vi += 1;
        }
        let inside = m
            .vmas
            .get(vi)
            .is_some_and(|v| v.start <= r.vaddr && vend <= v.end);
        if !inside {
            return Err(invalid(
                path,
                format!(
                    "page run {i} ({:#x}-{vend:#x}) is not inside one vma",
                    r.vaddr
                ),
            ));
        }
        prev = vend;
    }
    if m.mm.auxv.len() > 8 * 2 * 64 || m.mm.auxv.len() & 15 != 0 {
        return Err(invalid(
            path,
            format!(
                "auxv is {} bytes (must be pairs of u64, at most 64 pairs)",
                m.mm.auxv.len()
            ),
        ));
    }
    for (i, t) in m.threads.iter().enumerate() {
        if t.regs.len() != REGS_WORDS {
            return Err(invalid(
                path,
                format!(
                    "thread {i} (tid {}) has {} register words, expected {REGS_WORDS}",
                    t.tid,
                    t.regs.len()
                ),
            ));
        }
        if t.xstate.len() < 512 || t.xstate.len() > crate::sys::XSTATE_MAX {
            return Err(invalid(
                path,
                format!(
                    "thread {i} (tid {}) xstate is {} bytes",
                    t.tid,
                    t.xstate.len()
                ),
            ));
        }
        if t.ns_tid <= 0 {
            return Err(invalid(path, format!("thread {i} has tid {}", t.ns_tid)));
        }
    }
    if m.threads.len() > 4096 {
        return Err(invalid(
            path,
            format!("{} threads (cap 4096)", m.threads.len()),
        ));
    }
    for fd in &m.fds {
        if fd.fd < 0 {
            return Err(invalid(path, format!("negative fd number {}", fd.fd)));
        }
    }
    if m.members.len() > 4096 {
        return Err(invalid(
            path,
            format!("{} member processes (cap 4096)", m.members.len()),
        ));
    }
    for (i, mb) in m.members.iter().enumerate() {
        let ok = !mb.dir.is_empty()
            && mb.dir != "."
            && mb.dir != ".."
            && !mb.dir.contains('/')
            && !mb.dir.contains('\0');
        if !ok || mb.ns_pid <= 1 {
            return Err(invalid(
                path,
                format!(
                    "member {i} (pid {}, dir {:?}) is malformed",
                    mb.ns_pid, mb.dir
                ),
            ));
        }
    }
    let mut total = 0u64;
    for (i, p) in m.pipes.iter().enumerate() {
        total += p.data.len() as u64;
        if p.size == 0 || p.size > 1 << 30 || p.data.len() as u64 > p.size as u64 {
            return Err(invalid(
                path,
                format!(
                    "pipe {i} (ino {}) holds {} bytes with a capacity of {}",
                    p.ino,
                    p.data.len(),
                    p.size
                ),
            ));
        }
        if p.external && !p.data.is_empty() {
            return Err(invalid(path, format!("external pipe {i} carries data")));
        }
    }
    if total > META_MAX / 2 {
        return Err(invalid(path, format!("{total} bytes of pipe data")));
    }
    Ok(())
}

/// Check `pages.img`: exact size and header naming the same image.
pub fn check_pages_file(dir: &Path, m: &ImageMeta) -> Result<()> {
    let path = dir.join(PAGES_FILE);
    let mut f = File::open(&path).map_err(io_err(&path))?;
    let len = f.metadata().map_err(io_err(&path))?.len();
    if len != m.pages_file_len {
        return Err(ImageError::Truncated {
            path,
            what: format!(
                "pages file is {len} bytes, metadata expects {}",
                m.pages_file_len
            ),
        });
    }
    let mut h = [0u8; 24];
    f.read_exact(&mut h).map_err(io_err(&path))?;
    if &h[..8] != PAGES_MAGIC {
        return Err(ImageError::BadMagic { path });
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version != VERSION {
        return Err(ImageError::Version {
            path,
            found: version,
        });
    }
    let mut idb = [0u8; 8];
    idb.copy_from_slice(&h[16..24]);
    let id = u64::from_le_bytes(idb);
    if id != m.image_id {
        return Err(invalid(
            &path,
            format!(
                "pages file belongs to image {id:#x}, metadata is image {:#x}",
                m.image_id
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> ImageMeta {
        ImageMeta {
            image_id: 0xabcdef,
            created_unix: 1,
            pid: 42,
            ns_pids: vec![42, 2],
            hostname: "h".into(),
            kernel_release: "6.18".into(),
            comm: "prog".into(),
            exe: "/bin/prog".into(),
            exe_file: None,
            regs: vec![0; REGS_WORDS],
            xstate: vec![0; 1024],
            fs_base: 0,
            gs_base: 0,
            rseq: None,
            robust_list: 0,
            robust_list_len: 0,
            clear_child_tid: 0,
            vmas: vec![Vma {
                start: 0x10000,
                end: 0x20000,
                prot: 3,
                kind: VmaKind::AnonPrivate,
                name: String::new(),
                offset: 0,
                file: None,
                growsdown: false,
                maywrite: true,
                noreserve: false,
            }],
            page_runs: vec![PageRun {
                vaddr: 0x10000,
                npages: 2,
                offset: PAGES_DATA_OFFSET,
            }],
            pages_file_len: PAGES_DATA_OFFSET + 2 * PAGE,
            vdso_sha256: vec![],
            mm: MmFields::default(),
            sigactions: vec![],
            sigmask: 0,
            pending: vec![],
            altstack: AltStack::default(),
            fds: vec![],
            cwd: "/".into(),
            umask: 0o22,
            rlimits: vec![],
            creds: Creds::default(),
            personality: 0,
            itimers: vec![],
            syscall_note: String::new(),
            threads: vec![],
            no_new_privs: false,
            ns_ppid: 1,
            ns_pgid: 0,
            ns_sid: 0,
            members: vec![],
            pipes: vec![],
        }
    }

    fn write_sample(dir: &Path) -> ImageMeta {
        let m = sample();
        let mut pages = pages_header(m.image_id);
        pages.extend(vec![7u8; 2 * PAGE as usize]);
        std::fs::write(dir.join(PAGES_FILE), pages).unwrap();
        write_meta(dir, &m).unwrap();
        m
    }

    #[test]
    fn round_trip() {
        let d = tempfile::tempdir().unwrap();
        let m = write_sample(d.path());
        assert_eq!(load(d.path()).unwrap(), m);
    }

    #[test]
    fn corrupt_payload_is_checksum_error() {
        let d = tempfile::tempdir().unwrap();
        write_sample(d.path());
        let p = d.path().join(META_FILE);
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n - 10] ^= 0xff;
        std::fs::write(&p, b).unwrap();
        let e = load(d.path()).unwrap_err();
        assert!(matches!(e, ImageError::Checksum { .. }), "{e}");
        assert!(e.to_string().contains("image.meta"), "{e}");
    }

    #[test]
    fn truncated_meta_and_pages() {
        let d = tempfile::tempdir().unwrap();
        write_sample(d.path());
        let p = d.path().join(META_FILE);
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() - 3]).unwrap();
        let e = load(d.path()).unwrap_err();
        assert!(matches!(e, ImageError::Truncated { .. }), "{e}");
        std::fs::write(&p, &b[..20]).unwrap();
        assert!(matches!(
            load(d.path()).unwrap_err(),
            ImageError::Truncated { .. }
        ));
        std::fs::write(&p, &b).unwrap();
        let pp = d.path().join(PAGES_FILE);
        let pb = std::fs::read(&pp).unwrap();
        std::fs::write(&pp, &pb[..pb.len() - 1]).unwrap();
        let e = load(d.path()).unwrap_err();
        assert!(e.to_string().contains("pages file is"), "{e}");
    }

    #[test]
    fn version_4_images_are_refused_with_a_clear_message() {
        let d = tempfile::tempdir().unwrap();
        write_sample(d.path());
        let p = d.path().join(META_FILE);
        let mut b = std::fs::read(&p).unwrap();
        b[8..12].copy_from_slice(&4u32.to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        let e = load(d.path()).unwrap_err();
        assert!(matches!(e, ImageError::Version { found: 4, .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("version 4") && msg.contains("reads version 5"),
            "{msg}"
        );
    }

    #[test]
    fn malformed_tree_fields_are_refused() {
        let p = Path::new("x");
        let mut m = sample();
        m.members.push(Member {
            ns_pid: 3,
            dir: "../escape".into(),
            image_id: 1,
        });
        assert!(validate(p, &m)
            .unwrap_err()
            .to_string()
            .contains("member 0"));
        let mut m = sample();
        m.pipes.push(PipeImage {
            ino: 9,
            size: 4,
            data: vec![1; 5],
            external: false,
        });
        assert!(validate(p, &m).unwrap_err().to_string().contains("pipe 0"));
    }

    #[test]
    fn bad_magic_and_version() {
        let d = tempfile::tempdir().unwrap();
        write_sample(d.path());
        let p = d.path().join(META_FILE);
        let mut b = std::fs::read(&p).unwrap();
        b[8] = 9;
        std::fs::write(&p, &b).unwrap();
        assert!(matches!(
            load(d.path()).unwrap_err(),
            ImageError::Version { found: 9, .. }
        ));
        b[0] = b'X';
        std::fs::write(&p, &b).unwrap();
        assert!(matches!(
            load(d.path()).unwrap_err(),
            ImageError::BadMagic { .. }
        ));
    }

    #[test]
    fn garbage_payload_with_valid_checksum_fails_validation() {
        let d = tempfile::tempdir().unwrap();
        write_sample(d.path());
        let payload = vec![0x5au8; 300];
        let mut b = Vec::new();
        b.extend_from_slice(META_MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        b.extend_from_slice(&sha2::Sha256::digest(&payload));
        b.extend_from_slice(&payload);
        std::fs::write(d.path().join(META_FILE), b).unwrap();
        assert!(matches!(
            load(d.path()).unwrap_err(),
            ImageError::Archive { .. }
        ));
    }

    #[test]
    fn semantic_checks() {
        let p = Path::new("x");
        let mut m = sample();
        m.page_runs[0].vaddr = 0x30000;
        assert!(validate(p, &m)
            .unwrap_err()
            .to_string()
            .contains("not inside one vma"));
        let mut m = sample();
        m.vmas[0].start = 0x10001;
        assert!(validate(p, &m)
            .unwrap_err()
            .to_string()
            .contains("not page aligned"));
        let mut m = sample();
        m.regs.pop();
        assert!(validate(p, &m).unwrap_err().to_string().contains("regs"));
        let mut m = sample();
        m.page_runs[0].npages = 3;
        assert!(validate(p, &m).unwrap_err().to_string().contains("beyond"));
    }

    #[test]
    fn pages_file_of_other_image() {
        let d = tempfile::tempdir().unwrap();
        let m = write_sample(d.path());
        let mut pages = pages_header(m.image_id + 1);
        pages.extend(vec![7u8; 2 * PAGE as usize]);
        std::fs::write(d.path().join(PAGES_FILE), pages).unwrap();
        assert!(load(d.path())
            .unwrap_err()
            .to_string()
            .contains("belongs to image"));
    }
}
