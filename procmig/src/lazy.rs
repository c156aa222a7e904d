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
//!
//! Streamed images: the swap file may still be being written by the frozen source (see
//! [`crate::swap`]). A fault on a page not written yet waits (the faulting thread stays
//! blocked) until its chunk's tag appears; the background push follows the stream. Every
//! chunk is checked against its tag before any of its bytes reach the process. If the
//! stream makes no progress for [`RestoreOptions::stream_stall`](crate::RestoreOptions)
//! (the source host died), or a chunk fails its check, the pager kills the process
//! before it lets go of the userfaultfd: a missing page must never become a zero page.
//!
//! Bookkeeping is per run of pages (vaddr, npages, offset), not per page, so a 2 GiB
//! image costs a handful of map entries, not half a million.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::image::{self, VmaKind, PAGE};
use crate::swap::{SwapError, SwapReader};
use crate::sys::{self, uffd};

/// True for the VMAs a lazy restore pages on demand (writable private anonymous memory
/// but the stack); everything else is filled before the process runs.
pub fn paged_lazily(v: &image::Vma) -> bool {
    v.kind == VmaKind::AnonPrivate && !v.growsdown && v.prot & libc::PROT_WRITE as u32 != 0
}

/// Pages still to bring in: run start -> (pages, offset in the swap file).
#[derive(Debug, Clone, Default)]
pub(crate) struct Runs(BTreeMap<u64, (u64, u64)>);

impl Runs {
    pub(crate) fn add(&mut self, vaddr: u64, npages: u64, off: u64) {
        self.0.insert(vaddr, (npages, off));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Make `a` the start of a run if a run covers it.
    fn split_at(&mut self, a: u64) {
        let Some((&s, &(n, off))) = self.0.range(..a).next_back() else {
            return;
        };
        if s + n * PAGE > a {
            let k = (a - s) / PAGE;
            self.0.insert(s, (k, off));
            self.0.insert(a, (n - k, off + k * PAGE));
        }
    }

    fn remove_range(&mut self, start: u64, end: u64) -> Vec<(u64, (u64, u64))> {
        self.split_at(start);
        self.split_at(end);
        let keys: Vec<u64> = self.0.range(start..end).map(|(k, _)| *k).collect();
        keys.into_iter()
            .filter_map(|k| self.0.remove(&k).map(|v| (k, v)))
            .collect()
    }

    /// Take the page at `a` out; its offset if it was pending.
    fn take(&mut self, a: u64) -> Option<u64> {
        self.remove_range(a, a + PAGE)
            .first()
            .map(|(_, (_, off))| *off)
    }

    fn remap(&mut self, from: u64, to: u64, len: u64) {
        for (a, v) in self.remove_range(from, from + len) {
            self.0.insert(to + (a - from), v);
        }
    }

    /// The first run (in address order) whose first page is below `avail` in the file.
    fn first_below(&self, avail: u64) -> Option<(u64, u64, u64)> {
        self.0
            .iter()
            .find(|(_, (_, o))| o + PAGE <= avail)
            .map(|(a, (n, o))| (*a, *n, *o))
    }
}

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
    #[error(
        "pid {pid}: swap file: {source}; the process was killed rather than given a wrong page"
    )]
    Image {
        pid: i32,
        #[source]
        source: image::ImageError,
    },
    #[error("pid {pid}: the swap file {path} stopped growing at byte {at} of {len} for {secs} s (the source host died before it was complete?); the process was killed rather than given a wrong page")]
    Stalled {
        pid: i32,
        path: PathBuf,
        at: u64,
        len: u64,
        secs: u64,
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
    pages: SwapReader,
    pending: Runs,
    push_delay: Duration,
    stall: Duration,
) -> LazyPager {
    let push_after = Instant::now() + push_delay;
    let handle = std::thread::Builder::new()
        .name(format!("wisp-pager-{pid}"))
        .spawn(move || {
            Pager {
                pid,
                uffd,
                pages,
                pending,
                waiting: Vec::new(),
                stats: LazyStats::default(),
                push_after,
                stall,
                progress: (0, Instant::now()),
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
    pages: SwapReader,
    pending: Runs,
    /// Faults on pages not written yet: (address, offset).
    waiting: Vec<(u64, u64)>,
    stats: LazyStats,
    push_after: Instant,
    /// Longest wait for the stream to move on.
    stall: Duration,
    /// Bytes available, and since when.
    progress: (u64, Instant),
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
        if r.is_err() && self.pid != 0 {
            // Before the userfaultfd goes (and with it the registration: a later fault
            // would then read zeros), the process goes.
            let _ = sys::kill(self.pid, libc::SIGKILL);
        }
        let mut first = r.as_ref().err().map(|e| e.to_string());
        let own_err = r.as_ref().is_err();
        let mut total = r.as_ref().map(|s| *s).unwrap_or_default();
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
        match (r, first) {
            (Ok(_), None) => Ok(total),
            (Err(e), _) if own_err => Err(e),
            (_, Some(e)) => Err(LazyError::Read {
                pid: self.pid,
                source: std::io::Error::other(e),
            }),
            (Err(e), None) => Err(e),
        }
    }

    fn image_err(&self, e: SwapError) -> LazyError {
        match e {
            SwapError::Image(source) => LazyError::Image {
                pid: self.pid,
                source,
            },
            SwapError::NotYet { path, off, .. } => LazyError::Pages {
                pid: self.pid,
                addr: off,
                path,
                source: std::io::Error::other("read of bytes not written yet"),
            },
        }
    }

    /// Look for new chunks of a streamed swap file; fails when it stopped growing for
    /// longer than `stall`.
    fn refresh(&mut self) -> Result<u64, LazyError> {
        let avail = self.pages.refresh().map_err(|source| LazyError::Image {
            pid: self.pid,
            source,
        })?;
        if avail > self.progress.0 {
            self.progress = (avail, Instant::now());
        } else if !self.pages.complete() && self.progress.1.elapsed() >= self.stall {
            return Err(LazyError::Stalled {
                pid: self.pid,
                path: self.pages.path().to_path_buf(),
                at: avail,
                len: self.pages.len(),
                secs: self.stall.as_secs(),
            });
        }
        Ok(avail)
    }

    fn run_own(&mut self) -> Result<LazyStats, LazyError> {
        let mut buf = vec![0u8; 256 * PAGE as usize];
        loop {
            if let Step::Gone = self.drain_events()? {
                self.stats.process_gone = true;
                return Ok(self.stats);
            }
            if !self.waiting.is_empty() {
                let avail = self.refresh()?;
                let ready: Vec<(u64, u64)> = self
                    .waiting
                    .iter()
                    .filter(|(_, off)| off + PAGE <= avail)
                    .copied()
                    .collect();
                self.waiting.retain(|(_, off)| off + PAGE > avail);
                for (addr, off) in ready {
                    if let Step::Gone = self.answer(addr, Some(off))? {
                        self.stats.process_gone = true;
                        return Ok(self.stats);
                    }
                }
            }
            let now = Instant::now();
            let blocked_ms = if !self.waiting.is_empty() { 2 } else { 50 };
            if now < self.push_after && !self.pending.is_empty() {
                // Demand-paging phase: sleep until a fault arrives or a check-up is due.
                let ms = (self.push_after - now).as_millis().min(blocked_ms) as i32;
                if !sys::poll_in(self.uffd.as_raw_fd(), ms.max(1)) && !self.alive() {
                    self.stats.process_gone = true;
                    return Ok(self.stats);
                }
                continue;
            }
            if self.pending.is_empty() && self.waiting.is_empty() {
                break;
            }
            // A run of pages contiguous in memory and in the file, at most 256 pages, all
            // written already.
            let mut avail = self.pages.available();
            let mut next = self.pending.first_below(avail);
            if next.is_none() {
                avail = self.refresh()?;
                next = self.pending.first_below(avail);
            }
            let Some((start, npages, off)) = next else {
                // The stream has not got there yet: serve faults meanwhile.
                if !sys::poll_in(self.uffd.as_raw_fd(), 2) && !self.alive() {
                    self.stats.process_gone = true;
                    return Ok(self.stats);
                }
                continue;
            };
            let n = npages.min(256).min((avail - off) / PAGE);
            let data = &mut buf[..(n * PAGE) as usize];
            if let Err(e) = self.pages.read_at(data, off) {
                return Err(self.image_err(e));
            }
            match sys::uffd_copy(self.uffd.as_raw_fd(), start, data) {
                Ok(_) => {
                    self.pending.remove_range(start, start + n * PAGE);
                    self.stats.pushed += n;
                }
                Err((libc::EEXIST, done)) => {
                    // Part of the run was already faulted in: drop what is done plus the
                    // page that exists, retry the rest.
                    let skip = (done / PAGE + 1).min(n);
                    self.pending.remove_range(start, start + skip * PAGE);
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
                    self.pending.remove_range(start, start + PAGE);
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
                    self.pending.remap(from, to, len);
                    for w in self.waiting.iter_mut() {
                        if from <= w.0 && w.0 < from + len {
                            w.0 = to + (w.0 - from);
                        }
                    }
                }
                uffd::EVENT_REMOVE | uffd::EVENT_UNMAP => {
                    let (start, end) = (u(8), u(16));
                    self.pending.remove_range(start, end);
                    // A thread waiting there is woken by the kernel and faults again.
                    self.waiting.retain(|w| w.0 < start || w.0 >= end);
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
        let pages = self.pages.try_clone().map_err(|source| LazyError::Image {
            pid: self.pid,
            source,
        })?;
        let mut pending = self.pending.clone();
        // Pages the parent waits for are missing in the child's copy too.
        for (a, off) in &self.waiting {
            pending.add(*a, 1, *off);
        }
        let child = Pager {
            pid: 0,
            uffd,
            pages,
            pending,
            waiting: Vec::new(),
            stats: LazyStats::default(),
            push_after: self.push_after,
            stall: self.stall,
            progress: (0, Instant::now()),
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

    /// A fault at `addr`: answer it now, or queue it until its page is written.
    fn serve(&mut self, addr: u64) -> Result<Step, LazyError> {
        if self.waiting.iter().any(|w| w.0 == addr) {
            return Ok(Step::Go); // another thread waits for the same page
        }
        match self.pending.take(addr) {
            Some(off) if off + PAGE > self.pages.available() => {
                self.waiting.push((addr, off));
                Ok(Step::Go)
            }
            off => self.answer(addr, off),
        }
    }

    /// Put the page at `addr` in place: from the swap file at `off`, or zeros.
    fn answer(&mut self, addr: u64, off: Option<u64>) -> Result<Step, LazyError> {
        let fd = self.uffd.as_raw_fd();
        let r = if let Some(off) = off {
            let mut page = vec![0u8; PAGE as usize];
            if let Err(e) = self.pages.read_at(&mut page, off) {
                return Err(self.image_err(e));
            }
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
