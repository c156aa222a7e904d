//! The client's own caches, kept consistent by server callbacks, never by timeouts.
//!
//! - [`Meta`]: names (positive and negative) and attributes, so the kernel's lookups (it
//!   caches no names itself: a kernel entry invalidation takes the directory lock) and
//!   attribute fetches are answered here without a round trip to the server. The server
//!   records this client as a cacher of a directory *before* it reads it for a lookup, and
//!   calls back (`InvalidateInode` of the directory) before any change to it is answered.
//! - [`Dirty`] / [`WriteBack`]: delayed writes (Sprite's 30-second write-back). Blocks
//!   written through a cacheable open stay here until they are old enough, or someone
//!   needs them: `fsync`, a callback from the server because another host is about to look
//!   at the file, memory pressure, or unmount. A file written and removed before then never
//!   reaches the server.
//!
//! Races between a reply and a callback are settled by an epoch: every invalidation bumps
//! it, and a reply is cached only if no invalidation happened while it was in flight.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use wisp_proto::msg::{Attr, Cred, Time};

/// Names and attributes.
pub(crate) struct Meta {
    inner: Mutex<MetaInner>,
    enabled: bool,
    max_entries: usize,
}

#[derive(Default)]
struct MetaInner {
    epoch: u64,
    /// The latest invalidations: (epoch, inode; [`ALL`] for everything).
    recent: std::collections::VecDeque<(u64, u64)>,
    /// Epoch of the oldest invalidation dropped from `recent`.
    forgotten: u64,
    attrs: HashMap<u64, Attr>,
    /// dir -> name -> inode (None: the name does not exist).
    names: HashMap<u64, HashMap<Vec<u8>, Option<u64>>>,
    /// inode -> xattr name -> value (None: not set). The kernel asks for
    /// `security.capability` before every write.
    xattrs: HashMap<u64, HashMap<Vec<u8>, Option<Vec<u8>>>>,
    /// inode -> the version (bumped by the server on every open for writing) this host
    /// saw at its last open.
    versions: HashMap<u64, u64>,
    n_names: usize,
}

/// Stands for every inode in [`MetaInner::recent`].
const ALL: u64 = u64::MAX;
/// Invalidations remembered to judge answers in flight.
const RECENT: usize = 4096;

impl MetaInner {
    fn note(&mut self, ino: u64) {
        self.epoch += 1;
        if self.recent.len() == RECENT {
            let (e, _) = self.recent.pop_front().unwrap();
            self.forgotten = e;
        }
        self.recent.push_back((self.epoch, ino));
    }

    /// Whether an answer sent at epoch `since` about `inos` may be stale: one of them (or
    /// everything) was invalidated since.
    fn stale(&self, since: u64, inos: &[u64]) -> bool {
        if since < self.forgotten {
            return true;
        }
        self.recent
            .iter()
            .rev()
            .take_while(|(e, _)| *e > since)
            .any(|(_, i)| *i == ALL || inos.contains(i))
    }
}

/// What the cache knows of a name.
pub(crate) enum Hit {
    Found(Attr),
    Absent,
}

impl Meta {
    pub fn new(enabled: bool, max_entries: usize) -> Self {
        Meta {
            inner: Mutex::new(MetaInner::default()),
            enabled,
            max_entries: max_entries.max(16),
        }
    }

    /// The current epoch: take it before sending a request whose answer will be cached.
    pub fn epoch(&self) -> u64 {
        self.inner.lock().unwrap().epoch
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Option<Hit> {
        if !self.enabled {
            return None;
        }
        let m = self.inner.lock().unwrap();
        match m.names.get(&parent)?.get(name)? {
            None => Some(Hit::Absent),
            Some(ino) => m.attrs.get(ino).cloned().map(Hit::Found),
        }
    }

    pub fn attr(&self, ino: u64) -> Option<Attr> {
        if !self.enabled {
            return None;
        }
        self.inner.lock().unwrap().attrs.get(&ino).cloned()
    }

    /// The inode a cached name points to, if known.
    pub fn child(&self, parent: u64, name: &[u8]) -> Option<u64> {
        let m = self.inner.lock().unwrap();
        m.names.get(&parent)?.get(name).copied().flatten()
    }

    /// Cache a lookup's answer (`attr` None: the name does not exist), unless an
    /// invalidation arrived since `since`.
    pub fn put_entry(&self, since: u64, parent: u64, name: &[u8], attr: Option<&Attr>) {
        if !self.enabled || name == b"." || name == b".." {
            return;
        }
        let mut m = self.inner.lock().unwrap();
        let mut about = vec![parent];
        about.extend(attr.map(|a| a.ino));
        if m.stale(since, &about) {
            return;
        }
        if m.n_names >= self.max_entries || m.attrs.len() >= self.max_entries {
            // Bounded: start again rather than keep an LRU (lookups refill it at once).
            m.names.clear();
            m.attrs.clear();
            m.n_names = 0;
        }
        if let Some(a) = attr {
            m.attrs.insert(a.ino, a.clone());
        }
        if m.names
            .entry(parent)
            .or_default()
            .insert(name.to_vec(), attr.map(|a| a.ino))
            .is_none()
        {
            m.n_names += 1;
        }
    }

    /// Whether `ino` was invalidated since epoch `since`.
    pub fn invalidated_since(&self, since: u64, ino: u64) -> bool {
        self.inner.lock().unwrap().stale(since, &[ino])
    }

    /// Record the version an open returned; whether the pages this host may hold are of
    /// that version (the last version seen here, or one more if this open writes).
    pub fn same_version(&self, attr: &Attr, writing: bool) -> bool {
        let mut m = self.inner.lock().unwrap();
        if m.versions.len() >= self.max_entries {
            m.versions.clear();
        }
        match m.versions.insert(attr.ino, attr.version) {
            None => true,
            Some(v) => v == attr.version || (writing && v + 1 == attr.version),
        }
    }

    pub fn xattr(&self, ino: u64, name: &[u8]) -> Option<Option<Vec<u8>>> {
        if !self.enabled {
            return None;
        }
        self.inner
            .lock()
            .unwrap()
            .xattrs
            .get(&ino)?
            .get(name)
            .cloned()
    }

    pub fn put_xattr(&self, since: u64, ino: u64, name: &[u8], value: Option<&[u8]>) {
        if !self.enabled {
            return;
        }
        let mut m = self.inner.lock().unwrap();
        if m.stale(since, &[ino]) {
            return;
        }
        if m.xattrs.len() >= self.max_entries {
            m.xattrs.clear();
        }
        m.xattrs
            .entry(ino)
            .or_default()
            .insert(name.to_vec(), value.map(|v| v.to_vec()));
    }

    pub fn put_attr(&self, since: u64, attr: &Attr) {
        if !self.enabled {
            return;
        }
        let mut m = self.inner.lock().unwrap();
        if m.stale(since, &[attr.ino]) {
            return;
        }
        if m.attrs.len() >= self.max_entries {
            m.attrs.clear();
        }
        m.attrs.insert(attr.ino, attr.clone());
    }

    /// A callback for `ino`: drop its attributes and, if it is a directory, its names.
    pub fn invalidate(&self, ino: u64) {
        let mut m = self.inner.lock().unwrap();
        m.note(ino);
        m.attrs.remove(&ino);
        m.xattrs.remove(&ino);
        if let Some(n) = m.names.remove(&ino) {
            m.n_names -= n.len();
        }
    }

    /// This client changed `inos` and the names `names` itself (the server calls back only
    /// the *other* clients): drop them, and whatever the names pointed to. Called before
    /// and after the request, so no answer in flight across the change is cached.
    pub fn changed(&self, inos: &[u64], names: &[(u64, &[u8])]) {
        let mut m = self.inner.lock().unwrap();
        for (dir, name) in names {
            m.note(*dir);
            let target = m.names.get_mut(dir).and_then(|n| n.remove(*name));
            if let Some(t) = target {
                m.n_names -= 1;
                if let Some(t) = t {
                    m.note(t);
                    m.attrs.remove(&t);
                }
            }
        }
        for ino in inos {
            m.note(*ino);
            m.attrs.remove(ino);
            m.xattrs.remove(ino);
        }
    }

    /// Forget everything (the server restarted and forgot what we cache).
    pub fn clear(&self) {
        let mut m = self.inner.lock().unwrap();
        m.note(ALL);
        m.attrs.clear();
        m.xattrs.clear();
        m.names.clear();
        m.n_names = 0;
    }
}

/// Delayed writes of one file.
#[derive(Debug)]
pub(crate) struct Dirty {
    /// offset -> bytes; extents never overlap or touch.
    pub extents: BTreeMap<u64, Vec<u8>>,
    /// The file's size as this client sees it (never below the server's: truncations
    /// write back first).
    pub size: u64,
    pub mtime: Time,
    pub since: Instant,
    pub bytes: u64,
    /// Who wrote last (from the open it came through): the server checks the write-back
    /// against this identity.
    pub cred: Cred,
}

impl Dirty {
    fn new(size: u64) -> Self {
        Dirty {
            extents: BTreeMap::new(),
            size,
            mtime: Time::now(),
            since: Instant::now(),
            bytes: 0,
            cred: Cred::ROOT,
        }
    }

    /// Add a write; returns how many bytes more are held.
    fn add(&mut self, offset: u64, data: &[u8]) -> u64 {
        let end = offset + data.len() as u64;
        let before = self.bytes;
        // The common case, a sequential writer: extend the extent that ends here.
        let before_ext = self
            .extents
            .range(..=offset)
            .next_back()
            .map(|(s, b)| (*s, b.len() as u64));
        if let Some((start, len)) = before_ext {
            if start + len == offset
                && self
                    .extents
                    .range(offset..end.saturating_add(1))
                    .next()
                    .is_none()
            {
                let buf = self.extents.get_mut(&start).unwrap();
                buf.extend_from_slice(data);
                self.bytes += data.len() as u64;
                self.size = self.size.max(end);
                self.mtime = Time::now();
                return self.bytes - before;
            }
        }
        // General case: merge every extent that overlaps or touches [offset, end].
        let first = self
            .extents
            .range(..=offset)
            .next_back()
            .filter(|(s, b)| **s + b.len() as u64 >= offset)
            .map(|(s, _)| *s)
            .unwrap_or(offset);
        let touching: Vec<u64> = self.extents.range(first..=end).map(|(s, _)| *s).collect();
        let mut start = offset;
        let mut stop = end;
        let mut olds = Vec::with_capacity(touching.len());
        for s in touching {
            let b = self.extents.remove(&s).unwrap();
            self.bytes -= b.len() as u64;
            start = start.min(s);
            stop = stop.max(s + b.len() as u64);
            olds.push((s, b));
        }
        let mut merged = vec![0u8; (stop - start) as usize];
        for (s, b) in olds {
            let at = (s - start) as usize;
            merged[at..at + b.len()].copy_from_slice(&b);
        }
        let at = (offset - start) as usize;
        merged[at..at + data.len()].copy_from_slice(data);
        self.bytes += merged.len() as u64;
        self.extents.insert(start, merged);
        self.size = self.size.max(end);
        self.mtime = Time::now();
        self.bytes - before
    }

    /// Lay the delayed writes over `data`, read from the server at `offset`, for a read
    /// of `want` bytes.
    pub fn overlay(&self, offset: u64, want: u64, mut data: Vec<u8>) -> Vec<u8> {
        let end = (offset + want).min(self.size.max(offset + data.len() as u64));
        if end > offset + data.len() as u64 {
            data.resize((end - offset) as usize, 0);
        }
        let first = self
            .extents
            .range(..=offset)
            .next_back()
            .map(|(s, _)| *s)
            .unwrap_or(offset);
        for (s, b) in self.extents.range(first..end) {
            let e = s + b.len() as u64;
            let lo = (*s).max(offset);
            let hi = e.min(end);
            if lo < hi {
                data[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&b[(lo - s) as usize..(hi - s) as usize]);
            }
        }
        data
    }
}

/// Delayed writes of every file, bounded in memory.
pub(crate) struct WriteBack {
    pub delay: Duration,
    pub max_bytes: u64,
    state: Mutex<WbState>,
    stripes: Vec<Mutex<()>>,
}

#[derive(Default)]
struct WbState {
    files: HashMap<u64, Dirty>,
    /// Files being written back right now, with the size this client sees meanwhile.
    in_flight: HashMap<u64, (u64, Time)>,
    total: u64,
    /// Files write-shared since this client opened them: written through until the next
    /// cacheable open.
    uncached: HashSet<u64>,
    /// Write-backs that failed for good (disk full, file too big): the data was dropped;
    /// the errno is reported by the next close or fsync of the file.
    errors: HashMap<u64, i32>,
}

impl WriteBack {
    pub fn new(delay: Duration, max_bytes: u64) -> Self {
        WriteBack {
            delay,
            max_bytes: max_bytes.max(1 << 20),
            state: Mutex::new(WbState::default()),
            stripes: (0..64).map(|_| Mutex::new(())).collect(),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.delay.is_zero()
    }

    /// Serialises writes, reads of delayed data and write-back of one file.
    pub fn stripe(&self, ino: u64) -> std::sync::MutexGuard<'_, ()> {
        self.stripes[(ino % self.stripes.len() as u64) as usize]
            .lock()
            .unwrap()
    }

    pub fn cacheable(&self, ino: u64) -> bool {
        !self.state.lock().unwrap().uncached.contains(&ino)
    }

    pub fn set_cacheable(&self, ino: u64, yes: bool) {
        let mut s = self.state.lock().unwrap();
        if yes {
            s.uncached.remove(&ino);
        } else {
            s.uncached.insert(ino);
        }
    }

    /// Whether `ino` has delayed writes held or being written back.
    pub fn holds(&self, ino: u64) -> bool {
        let s = self.state.lock().unwrap();
        s.files.contains_key(&ino) || s.in_flight.contains_key(&ino)
    }

    pub fn is_dirty(&self, ino: u64) -> bool {
        self.state.lock().unwrap().files.contains_key(&ino)
    }

    pub fn any(&self) -> bool {
        !self.state.lock().unwrap().files.is_empty()
    }

    /// Hold a write (caller holds the stripe). Returns the bytes now held in all.
    ///
    /// A file's size as seen here is the larger of the server's and the end of the delayed
    /// writes, so a new entry needs no size from the server.
    pub fn add(&self, ino: u64, offset: u64, data: &[u8], cred: &Cred) -> u64 {
        let mut s = self.state.lock().unwrap();
        if !s.files.contains_key(&ino) {
            let size = s.in_flight.get(&ino).map(|(size, _)| *size).unwrap_or(0);
            s.files.insert(ino, Dirty::new(size));
        }
        let d = s.files.get_mut(&ino).unwrap();
        if d.cred != *cred {
            d.cred = cred.clone();
        }
        let grew = d.add(offset, data);
        s.total += grew;
        s.total
    }

    /// Take a file's delayed writes to write them back (caller holds the stripe); it is
    /// marked in flight until [`WriteBack::done`].
    pub fn take(&self, ino: u64) -> Option<Dirty> {
        let mut s = self.state.lock().unwrap();
        let d = s.files.remove(&ino)?;
        s.total -= d.bytes;
        s.in_flight.insert(ino, (d.size, d.mtime));
        Some(d)
    }

    /// Write-back finished; on failure the writes are held again (newer ones win).
    pub fn done(&self, ino: u64, failed: Option<Dirty>) {
        let mut s = self.state.lock().unwrap();
        s.in_flight.remove(&ino);
        if let Some(old) = failed {
            let newer = s.files.remove(&ino);
            let mut d = old;
            if let Some(n) = newer {
                s.total -= n.bytes;
                for (off, b) in n.extents {
                    d.add(off, &b);
                }
                d.size = d.size.max(n.size);
                d.mtime = n.mtime;
                d.cred = n.cred;
            }
            s.total += d.bytes;
            s.files.insert(ino, d);
        }
    }

    /// A write-back failed for good: forget the data, remember the error for close/fsync.
    pub fn failed(&self, ino: u64, errno: i32) {
        let mut s = self.state.lock().unwrap();
        s.in_flight.remove(&ino);
        s.errors.insert(ino, errno);
    }

    /// The error of a failed write-back of `ino`, once.
    pub fn take_error(&self, ino: u64) -> Option<i32> {
        self.state.lock().unwrap().errors.remove(&ino)
    }

    /// Drop a file's delayed writes (it was removed). Returns the bytes dropped.
    pub fn discard(&self, ino: u64) -> u64 {
        let mut s = self.state.lock().unwrap();
        s.uncached.remove(&ino);
        match s.files.remove(&ino) {
            Some(d) => {
                s.total -= d.bytes;
                d.bytes
            }
            None => 0,
        }
    }

    /// Read through the delayed writes (caller holds the stripe).
    pub fn with_dirty<T>(&self, ino: u64, f: impl FnOnce(Option<&Dirty>) -> T) -> T {
        f(self.state.lock().unwrap().files.get(&ino))
    }

    /// The size and mtime this client sees for a file with delayed writes.
    pub fn overlay_attr(&self, a: &mut Attr) {
        let s = self.state.lock().unwrap();
        let seen = s
            .files
            .get(&a.ino)
            .map(|d| (d.size, d.mtime))
            .or_else(|| s.in_flight.get(&a.ino).copied());
        if let Some((size, mtime)) = seen {
            a.size = a.size.max(size);
            a.blocks = a.blocks.max(a.size.div_ceil(512));
            a.mtime = mtime;
            a.ctime = mtime;
        }
    }

    /// Files whose oldest delayed write is at least `age` old, oldest first.
    pub fn older_than(&self, age: Duration) -> Vec<u64> {
        let s = self.state.lock().unwrap();
        let mut v: Vec<(Instant, u64)> = s
            .files
            .iter()
            .filter(|(_, d)| d.since.elapsed() >= age)
            .map(|(i, d)| (d.since, *i))
            .collect();
        v.sort();
        v.into_iter().map(|(_, i)| i).collect()
    }

    pub fn total(&self) -> u64 {
        self.state.lock().unwrap().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(d: &Dirty) -> Vec<u8> {
        d.overlay(0, d.size, Vec::new())
    }

    #[test]
    fn extents_merge_like_a_file() {
        let mut d = Dirty::new(0);
        let mut model = Vec::new();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let off = rng % 5000;
            let len = (rng >> 20) % 300 + 1;
            let byte = (rng >> 40) as u8;
            let data = vec![byte; len as usize];
            d.add(off, &data);
            let end = (off + len) as usize;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[off as usize..end].copy_from_slice(&data);
            assert_eq!(d.size as usize, model.len());
        }
        assert_eq!(flat(&d), model);
        let held: u64 = d.extents.values().map(|b| b.len() as u64).sum();
        assert_eq!(held, d.bytes);
        let mut prev_end = None;
        for (s, b) in &d.extents {
            if let Some(p) = prev_end {
                assert!(*s > p, "extents overlap or touch");
            }
            prev_end = Some(s + b.len() as u64);
        }
    }

    #[test]
    fn overlay_lays_writes_over_server_data() {
        let mut d = Dirty::new(10);
        d.add(2, b"ab");
        d.add(12, b"xy");
        // The server has 10 bytes of '.'; the client sees 14.
        let got = d.overlay(0, 100, vec![b'.'; 10]);
        assert_eq!(got, b"..ab......\0\0xy");
        assert_eq!(d.overlay(3, 2, b"..".to_vec()), b"b.");
        assert_eq!(d.overlay(11, 10, Vec::new()), b"\0xy");
    }

    #[test]
    fn sequential_writes_stay_one_extent() {
        let mut d = Dirty::new(0);
        for i in 0..100u64 {
            d.add(i * 4096, &[1u8; 4096]);
        }
        assert_eq!(d.extents.len(), 1);
        assert_eq!(d.bytes, 409_600);
    }

    #[test]
    fn stale_answers_are_not_cached() {
        let m = Meta::new(true, 1000);
        let e = m.epoch();
        m.invalidate(1);
        m.put_entry(e, 1, b"x", None);
        assert!(m.lookup(1, b"x").is_none());
        let e = m.epoch();
        m.put_entry(e, 1, b"x", None);
        assert!(matches!(m.lookup(1, b"x"), Some(Hit::Absent)));
        m.changed(&[], &[(1, b"x")]);
        assert!(m.lookup(1, b"x").is_none());
        // An unrelated invalidation in flight does not stop an answer being cached.
        let e = m.epoch();
        m.invalidate(7);
        m.put_entry(e, 1, b"y", None);
        assert!(matches!(m.lookup(1, b"y"), Some(Hit::Absent)));
        let e = m.epoch();
        m.clear();
        m.put_entry(e, 1, b"z", None);
        assert!(m.lookup(1, b"z").is_none());
    }
}
