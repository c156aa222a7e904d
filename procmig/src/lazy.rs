//! Lazy restore (post-copy): the restored process starts before its anonymous memory is
//! filled. Its private anonymous VMAs (heap, malloc arenas; not the stack) are registered
//! with a userfaultfd created inside it; a pager thread in the restorer answers each
//! missing-page fault from the swap file with UFFDIO_COPY (UFFDIO_ZEROPAGE for pages the
//! image does not hold) and, between faults, pushes the remaining pages in the background.
//! When every page has been pushed the userfaultfd is closed: from then on the process
//! depends on nothing but itself (no residual dependency on the swap file).
//!
//! munmap/mremap/MADV_DONTNEED of registered memory arrive as non-cooperative events and
//! update the set of pages still to push. A fork() during the lazy window arrives as
//! UFFD_EVENT_FORK with a userfaultfd of the child's copy of the memory: a pager thread of
//! its own serves the child from the same swap file, starting from the pages still
//! pending in the parent at that moment (the kernel refuses UFFDIO_COPY with EAGAIN while
//! a fork is in progress, so no page slips between the two sets); it ends when every
//! page is in or the child's memory is gone (exit or exec).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::thread::JoinHandle;

use crate::image::PAGE;
use crate::sys::{self, uffd};

/// Errors of the lazy pager.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("pid {pid}: cannot read page {addr:#x} from {path}: {source}")]
    Pages {
        pid: i32,
        addr: u64,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: userfaultfd {op} at {addr:#x} failed: errno {errno}")]
    Uffd {
        pid: i32,
        op: &'static str,
        addr: u64,
        errno: i32,
    },
    #[error("pid {pid}: cannot read userfaultfd: {source}")]
    Read {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
}

/// What the pager did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LazyStats {
    /// Faults answered (pages the process touched before they were pushed).
    pub faults: u64,
    /// Pages pushed in the background.
    pub pushed: u64,
    /// True when the process went away before all pages were pushed.
    pub process_gone: bool,
}

/// Handle on the pager thread of a lazily restored process.
#[derive(Debug)]
pub struct LazyPager {
    /// One pager thread per lazily restored process (none when nothing is paged lazily).
    handles: Vec<JoinHandle<Result<LazyStats, LazyError>>>,
}

impl LazyPager {
    /// One handle over the pagers of several processes.
    pub(crate) fn all(pagers: Vec<LazyPager>) -> Self {
        LazyPager {
            handles: pagers.into_iter().flat_map(|p| p.handles).collect(),
        }
    }

    /// Wait until all pages are in the process(es) (or they exited); stats are summed,
    /// the first error is returned.
    pub fn wait(self) -> Result<LazyStats, LazyError> {
        let mut total = LazyStats::default();
        let mut first = None;
        for h in self.handles {
            match h.join() {
                Ok(Ok(s)) => {
                    total.faults += s.faults;
                    total.pushed += s.pushed;
                    total.process_gone |= s.process_gone;
                }
                Ok(Err(e)) => {
                    first.get_or_insert(e);
                }
                Err(_) => {
                    first.get_or_insert(LazyError::Read {
                        pid: 0,
                        source: std::io::Error::other("pager thread panicked"),
                    });
                }
            }
        }
        first.map_or(Ok(total), Err)
    }
}

/// Start the pager for `pid` over `uffd`; `pending` maps page address -> offset in `pages`.
/// Until `push_delay` has passed only faults are answered (pure demand paging); then the
/// rest is pushed in the background.
pub(crate) fn start(
    pid: i32,
    uffd: OwnedFd,
    pages: File,
    path: PathBuf,
    pending: BTreeMap<u64, u64>,
    push_delay: std::time::Duration,
) -> LazyPager {
    let push_after = std::time::Instant::now() + push_delay;
    let handle = std::thread::Builder::new()
        .name(format!("wisp-pager-{pid}"))
        .spawn(move || {
            Pager {
                pid,
                uffd,
                pages,
                path,
                pending,
                stats: LazyStats::default(),
                push_after,
                children: Vec::new(),
            }
            .run()
        })
        .map_err(|e| e.to_string());
    match handle {
        Ok(handle) => LazyPager {
            handles: vec![handle],
        },
        // Could not spawn: report through a thread that returns the error at once.
        Err(e) => LazyPager {
            handles: vec![std::thread::spawn(move || {
                Err(LazyError::Read {
                    pid,
                    source: std::io::Error::other(e),
                })
            })],
        },
    }
}

struct Pager {
    pid: i32,
    uffd: OwnedFd,
    pages: File,
    path: PathBuf,
    pending: BTreeMap<u64, u64>,
    stats: LazyStats,
    push_after: std::time::Instant,
    /// Pagers of children forked during the lazy window.
    children: Vec<JoinHandle<Result<LazyStats, LazyError>>>,
}

enum Step {
    Go,
    Gone,
}

impl Drop for Pager {
    /// Unregister explicitly instead of relying on the last close of the userfaultfd: a
    /// fork elsewhere in this process may briefly hold a copy of the descriptor, and a
    /// fault on a still-registered range would then wait for a reader that is gone.
    fn drop(&mut self) {
        if self.pid == 0 {
            return; // a forked child's pager: its pid is not known
        }
        if let Ok(maps) = crate::procfs::smaps(self.pid) {
            for m in maps.iter().filter(|m| m.has_flag("um")) {
                sys::uffd_unregister(self.uffd.as_raw_fd(), m.start, m.end - m.start);
            }
        }
    }
}

impl Pager {
    /// Page in everything, then wait for the pagers of forked children; stats are summed.
    fn run(mut self) -> Result<LazyStats, LazyError> {
        let r = self.run_own();
        let mut first = r.as_ref().err().map(|e| e.to_string());
        let mut total = r.unwrap_or_default();
        for h in std::mem::take(&mut self.children) {
            match h.join() {
                Ok(Ok(s)) => {
                    total.faults += s.faults;
                    total.pushed += s.pushed;
                }
                Ok(Err(e)) => {
                    first.get_or_insert(e.to_string());
                }
                Err(_) => {
                    first.get_or_insert("child pager panicked".into());
                }
            }
        }
        match first {
            None => Ok(total),
            Some(e) => Err(LazyError::Read {
                pid: self.pid,
                source: std::io::Error::other(e),
            }),
        }
    }

    fn run_own(&mut self) -> Result<LazyStats, LazyError> {
        let mut buf = vec![0u8; 64 * PAGE as usize];
        loop {
            if let Step::Gone = self.drain_events()? {
                self.stats.process_gone = true;
                return Ok(self.stats);
            }
            let now = std::time::Instant::now();
            if now < self.push_after && !self.pending.is_empty() {
                // Demand-paging phase: sleep until a fault arrives or a check-up is due.
                let ms = (self.push_after - now).as_millis().min(50) as i32;
                if !sys::poll_in(self.uffd.as_raw_fd(), ms.max(1)) && !self.alive() {
                    self.stats.process_gone = true;
                    return Ok(self.stats);
                }
                continue;
            }
            let Some((&start, &off)) = self.pending.iter().next() else {
                break;
            };
            // A run of pages contiguous in memory and in the file, at most 64 pages.
            let mut n = 1u64;
            while n < 64 && self.pending.get(&(start + n * PAGE)) == Some(&(off + n * PAGE)) {
                n += 1;
            }
            let data = &mut buf[..(n * PAGE) as usize];
            self.pages
                .read_exact_at(data, off)
                .map_err(|source| LazyError::Pages {
                    pid: self.pid,
                    addr: start,
                    path: self.path.clone(),
                    source,
                })?;
            match sys::uffd_copy(self.uffd.as_raw_fd(), start, data) {
                Ok(_) => {
                    for k in 0..n {
                        self.pending.remove(&(start + k * PAGE));
                    }
                    self.stats.pushed += n;
                }
                Err((libc::EEXIST, done)) => {
                    // Part of the run was already faulted in: drop what is done plus the
                    // page that exists, retry the rest.
                    let skip = done / PAGE + 1;
                    for k in 0..skip.min(n) {
                        self.pending.remove(&(start + k * PAGE));
                    }
                    self.stats.pushed += done / PAGE;
                }
                Err((libc::EAGAIN, _)) => continue, // an event is pending: drain it first
                Err((libc::ESRCH, _)) if self.pid == 0 => {
                    self.stats.process_gone = true;
                    return Ok(self.stats);
                }
                Err((libc::ESRCH, _)) | Err((libc::ENOENT, _)) if !self.alive() => {
                    self.stats.process_gone = true;
                    return Ok(self.stats);
                }
                Err((libc::ENOENT, _)) | Err((libc::EINVAL, _)) => {
                    // No registered VMA there any more (unmapped and not yet reported).
                    self.pending.remove(&start);
                }
                Err((errno, _)) => {
                    return Err(LazyError::Uffd {
                        pid: self.pid,
                        op: "copy",
                        addr: start,
                        errno,
                    })
                }
            }
        }
        Ok(self.stats)
    }

    fn alive(&self) -> bool {
        if self.pid == 0 {
            // A forked child's pager: its memory is gone when a copy fails with ESRCH.
            return true;
        }
        std::fs::metadata(format!("/proc/{}/mem", self.pid)).is_ok()
            && crate::dump::process_state(self.pid).is_some_and(|s| s != 'Z' && s != 'X')
    }

    /// Answer every queued message (faults first priority, then events).
    fn drain_events(&mut self) -> Result<Step, LazyError> {
        let fd = self.uffd.as_raw_fd();
        let mut msg = [0u8; uffd::MSG_LEN];
        loop {
            if !sys::poll_in(fd, 0) {
                return Ok(Step::Go);
            }
            match nix::unistd::read(fd, &mut msg) {
                Ok(n) if n == uffd::MSG_LEN => {}
                Ok(_) => return Ok(Step::Gone),
                Err(nix::errno::Errno::EAGAIN) => return Ok(Step::Go),
                Err(e) => {
                    return Err(LazyError::Read {
                        pid: self.pid,
                        source: e.into(),
                    })
                }
            }
            let u = |o: usize| {
                let mut a = [0u8; 8];
                a.copy_from_slice(&msg[o..o + 8]);
                u64::from_le_bytes(a)
            };
            match msg[0] {
                uffd::EVENT_PAGEFAULT => {
                    let addr = u(16) & !(PAGE - 1);
                    self.stats.faults += 1;
                    if let Step::Gone = self.serve(addr)? {
                        return Ok(Step::Gone);
                    }
                }
                uffd::EVENT_REMAP => {
                    let (from, to, len) = (u(8), u(16), u(24));
                    let moved: Vec<(u64, u64)> = self
                        .pending
                        .range(from..from + len)
                        .map(|(a, o)| (*a, *o))
                        .collect();
                    for (a, o) in moved {
                        self.pending.remove(&a);
                        self.pending.insert(to + (a - from), o);
                    }
                }
                uffd::EVENT_REMOVE | uffd::EVENT_UNMAP => {
                    let (start, end) = (u(8), u(16));
                    let gone: Vec<u64> = self.pending.range(start..end).map(|(a, _)| *a).collect();
                    for a in gone {
                        self.pending.remove(&a);
                    }
                }
                uffd::EVENT_FORK => {
                    let ufd = u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]]) as i32;
                    self.adopt_fork(ufd)?;
                }
                _ => {}
            }
        }
    }

    /// A child forked: serve its copy of the memory from a pager of its own.
    fn adopt_fork(&mut self, ufd: i32) -> Result<(), LazyError> {
        // SAFETY: the kernel installed `ufd` in this process for the event just read;
        // nothing else owns it.
        let uffd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(ufd) };
        let pages = self.pages.try_clone().map_err(|source| LazyError::Pages {
            pid: self.pid,
            addr: 0,
            path: self.path.clone(),
            source,
        })?;
        let child = Pager {
            pid: 0,
            uffd,
            pages,
            path: self.path.clone(),
            pending: self.pending.clone(),
            stats: LazyStats::default(),
            push_after: self.push_after,
            children: Vec::new(),
        };
        let h = std::thread::Builder::new()
            .name(format!("wisp-pager-{}-child", self.pid))
            .spawn(move || child.run())
            .map_err(|e| LazyError::Read {
                pid: self.pid,
                source: e,
            })?;
        self.children.push(h);
        Ok(())
    }

    fn serve(&mut self, addr: u64) -> Result<Step, LazyError> {
        let fd = self.uffd.as_raw_fd();
        let r = if let Some(off) = self.pending.remove(&addr) {
            let mut page = vec![0u8; PAGE as usize];
            self.pages
                .read_exact_at(&mut page, off)
                .map_err(|source| LazyError::Pages {
                    pid: self.pid,
                    addr,
                    path: self.path.clone(),
                    source,
                })?;
            sys::uffd_copy(fd, addr, &page)
                .map(|_| ())
                .map_err(|(e, _)| e)
        } else {
            sys::uffd_zeropage(fd, addr, PAGE)
        };
        match r {
            Ok(()) => Ok(Step::Go),
            Err(libc::EEXIST) => {
                sys::uffd_wake(fd, addr, PAGE);
                Ok(Step::Go)
            }
            Err(libc::ESRCH) if self.pid == 0 => Ok(Step::Gone),
            Err(_) if !self.alive() => Ok(Step::Gone),
            Err(errno) => Err(LazyError::Uffd {
                pid: self.pid,
                op: "fault answer",
                addr,
                errno,
            }),
        }
    }
}
