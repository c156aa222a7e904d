//! The swap file's integrity and progress record, `pages.sum`, and the verified reader of
//! `pages.img` that restore and the lazy pager use.
//!
//! # Why
//! A migration image lives in the shared file system while it moves. Whoever can write
//! there must not be able to make a restore run altered memory, and an image of one job
//! must not be restorable as another. Every dump therefore gets a fresh random 256-bit key
//! (its *migration key*); the image carries HMAC-SHA256 tags made with it, and the key goes
//! to the target over the authenticated, encrypted agent connection only (and into the
//! job's record for a restart), never into the image.
//!
//! # Streaming
//! The same record tells a reader how much of `pages.img` is written: a lazy migration
//! starts the target as soon as the metadata is written, while the frozen source still
//! streams page contents (see [`crate::dump::Streamer`]). A chunk becomes readable when its
//! tag is in `pages.sum`; the source writes the chunk's data first (the file system sends
//! writes through to the server at once), then the tag.
//!
//! # `pages.sum`
//! ```text
//! offset size
//! 0      8    magic b"WISPSUM1"
//! 8      8    image id u64 LE (same as image.meta and pages.img)
//! 16     8    final length of pages.img, u64 LE
//! 24     32   meta tag: HMAC(key, "wisp-meta" | tag length u16 | tag | image id |
//!             pages length | SHA-256 of the image.meta payload)
//! 56     2    owner tag length (at most 256), u16 LE
//! 58     256  owner tag (the job the image belongs to, e.g. "job 12"), zero padded
//! 512    40*i chunk i: end offset u64 LE, then HMAC(key, "wisp-chunk" | image id | i |
//!             start | end | bytes start..end of pages.img)
//! ```
//! Chunks cover pages.img from byte 0 without gaps, in order; each is at most [`CHUNK`]
//! bytes. The file is complete when the last chunk ends at the final length.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ring::hmac;

use crate::image::{self, ImageError};

/// File name of the record inside an image directory.
pub const SUM_FILE: &str = "pages.sum";
/// Magic of `pages.sum`.
pub const SUM_MAGIC: &[u8; 8] = b"WISPSUM1";
/// Largest chunk (1 MiB: 256 pages).
pub const CHUNK: u64 = 1 << 20;
/// Header length of `pages.sum`; chunk entries follow.
pub const SUM_HEADER: u64 = 512;
/// Length of one chunk entry.
pub const ENTRY: u64 = 40;
/// Longest owner tag.
pub const TAG_MAX: usize = 256;

/// A migration key (random per dump).
pub type MacKey = [u8; 32];

/// What a restore checks an image against: the key of its migration and the owner the
/// image must belong to.
#[derive(Clone)]
pub struct MacCheck {
    pub key: MacKey,
    pub tag: String,
}

impl std::fmt::Debug for MacCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MacCheck")
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

/// Constant-time equality of two tags.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh random migration key.
pub fn new_key() -> MacKey {
    use ring::rand::SecureRandom;
    let mut k = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut k)
        .expect("the system random number generator failed");
    k
}

fn chunk_ctx(key: &hmac::Key, image_id: u64, index: u64, start: u64) -> hmac::Context {
    let mut c = hmac::Context::with_key(key);
    c.update(b"wisp-chunk");
    c.update(&image_id.to_le_bytes());
    c.update(&index.to_le_bytes());
    c.update(&start.to_le_bytes());
    c
}

fn meta_tag(
    key: &hmac::Key,
    tag: &str,
    image_id: u64,
    pages_len: u64,
    digest: &[u8; 32],
) -> hmac::Tag {
    let mut c = hmac::Context::with_key(key);
    c.update(b"wisp-meta");
    c.update(&(tag.len() as u16).to_le_bytes());
    c.update(tag.as_bytes());
    c.update(&image_id.to_le_bytes());
    c.update(&pages_len.to_le_bytes());
    c.update(digest);
    c.sign()
}

/// Tags the bytes of a pages file as they are written, in order, chunk by chunk.
pub(crate) struct ChunkMacs {
    key: hmac::Key,
    image_id: u64,
    /// Bytes fed so far (= the pages file offset reached).
    pos: u64,
    start: u64,
    ctx: Option<hmac::Context>,
    /// Completed chunks: (end, tag).
    done: Vec<(u64, [u8; 32])>,
    /// How many of `done` are in `pages.sum` already.
    saved: usize,
}

impl std::fmt::Debug for ChunkMacs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkMacs")
            .field("pos", &self.pos)
            .field("chunks", &self.done.len())
            .finish_non_exhaustive()
    }
}

impl ChunkMacs {
    pub(crate) fn new(key: &MacKey, image_id: u64) -> Self {
        ChunkMacs {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            image_id,
            pos: 0,
            start: 0,
            ctx: None,
            done: Vec::new(),
            saved: 0,
        }
    }

    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    /// Bytes written at the current end of the pages file.
    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.ctx.is_none() {
                self.start = self.pos;
                let i = self.done.len() as u64;
                self.ctx = Some(chunk_ctx(&self.key, self.image_id, i, self.start));
            }
            let room = (CHUNK - (self.pos - self.start)) as usize;
            let n = room.min(data.len());
            if let Some(c) = self.ctx.as_mut() {
                c.update(&data[..n]);
            }
            self.pos += n as u64;
            data = &data[n..];
            if self.pos - self.start == CHUNK {
                self.cut();
            }
        }
    }

    /// End the current chunk here (nothing if it is empty).
    pub(crate) fn cut(&mut self) {
        if let Some(mut c) = self.ctx.take() {
            c.update(&self.pos.to_le_bytes());
            let mut t = [0u8; 32];
            t.copy_from_slice(c.sign().as_ref());
            self.done.push((self.pos, t));
        }
    }

    /// Write the header of `dir/pages.sum` (creating it) and the chunks done so far.
    pub(crate) fn write_header(
        &mut self,
        dir: &Path,
        tag: &str,
        pages_len: u64,
        meta_digest: &[u8; 32],
    ) -> Result<File, ImageError> {
        let path = dir.join(SUM_FILE);
        if tag.len() > TAG_MAX {
            return Err(ImageError::Invalid {
                path,
                detail: format!("owner tag of {} bytes (at most {TAG_MAX})", tag.len()),
            });
        }
        let mut h = vec![0u8; SUM_HEADER as usize];
        h[..8].copy_from_slice(SUM_MAGIC);
        h[8..16].copy_from_slice(&self.image_id.to_le_bytes());
        h[16..24].copy_from_slice(&pages_len.to_le_bytes());
        let t = meta_tag(&self.key, tag, self.image_id, pages_len, meta_digest);
        h[24..56].copy_from_slice(t.as_ref());
        h[56..58].copy_from_slice(&(tag.len() as u16).to_le_bytes());
        h[58..58 + tag.len()].copy_from_slice(tag.as_bytes());
        let mut f = image::create_private_file(&path)?;
        f.write_all(&h).map_err(|source| ImageError::Io {
            path: path.clone(),
            source,
        })?;
        self.saved = 0;
        self.save(&f, &path)?;
        Ok(f)
    }

    /// Append the chunk entries not yet in `pages.sum`.
    pub(crate) fn save(&mut self, f: &File, path: &Path) -> Result<(), ImageError> {
        if self.saved == self.done.len() {
            return Ok(());
        }
        let mut b = Vec::with_capacity((self.done.len() - self.saved) * ENTRY as usize);
        for (end, t) in &self.done[self.saved..] {
            b.extend_from_slice(&end.to_le_bytes());
            b.extend_from_slice(t);
        }
        f.write_all_at(&b, SUM_HEADER + self.saved as u64 * ENTRY)
            .map_err(|source| ImageError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        self.saved = self.done.len();
        Ok(())
    }
}

/// Why a read of the swap file failed.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{path}: bytes {off}..{end} are not written yet")]
    NotYet { path: PathBuf, off: u64, end: u64 },
}

/// Reads `pages.img`, verifying each chunk's tag before handing out any of its bytes
/// (each chunk is read once, checked in memory and kept, so nothing can change between
/// the check and the use). Without a [`MacCheck`] (a local restore by the procmig CLI) it
/// reads the complete file as it is.
pub struct SwapReader {
    pages: File,
    path: PathBuf,
    sum: Option<(File, PathBuf)>,
    key: Option<hmac::Key>,
    image_id: u64,
    len: u64,
    /// Complete chunks known: (end, tag).
    chunks: Vec<(u64, [u8; 32])>,
    /// The last chunk read and verified: (index, bytes).
    cache: Option<(usize, Vec<u8>)>,
}

impl std::fmt::Debug for SwapReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwapReader")
            .field("path", &self.path)
            .field("available", &self.available())
            .finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How long a read of the swap file is retried while it fails with an I/O error (the file
/// server restarting, or unreachable): the faulting thread waits, it never gets a wrong
/// or zero page. Past this the pager gives up and the job is killed with the reason.
pub const IO_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(180);

/// Retry `op` while it fails with an I/O error, for at most [`IO_RETRY_FOR`].
fn retrying<T>(mut op: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(50);
    loop {
        match op() {
            Err(e)
                if e.kind() != std::io::ErrorKind::UnexpectedEof
                    && start.elapsed() < IO_RETRY_FOR =>
            {
                tracing::debug!("swap file read failed, retrying: {e}");
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
            }
            r => return r,
        }
    }
}

impl SwapReader {
    /// Open the swap file of the image in `dir` (metadata `meta`, whose payload has SHA-256
    /// `digest`); with `check`, verify that the image belongs to `check.tag` and that its
    /// metadata was made with `check.key`.
    pub fn open(
        dir: &Path,
        meta: &image::ImageMeta,
        digest: &[u8; 32],
        check: Option<&MacCheck>,
    ) -> Result<Self, ImageError> {
        let path = dir.join(image::PAGES_FILE);
        let pages = File::open(&path).map_err(io(&path))?;
        let mut r = SwapReader {
            pages,
            path,
            sum: None,
            key: None,
            image_id: meta.image_id,
            len: meta.pages_file_len,
            chunks: Vec::new(),
            cache: None,
        };
        let Some(check) = check else {
            return Ok(r);
        };
        let sp = dir.join(SUM_FILE);
        let f = File::open(&sp).map_err(|source| ImageError::Io {
            path: sp.clone(),
            source: std::io::Error::new(
                source.kind(),
                format!("the image has no integrity record ({source}); refusing to restore it"),
            ),
        })?;
        let mut h = [0u8; SUM_HEADER as usize];
        f.read_exact_at(&mut h, 0).map_err(io(&sp))?;
        if &h[..8] != SUM_MAGIC {
            return Err(ImageError::BadMagic { path: sp });
        }
        let u = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or([0; 8]));
        let tlen = u16::from_le_bytes([h[56], h[57]]) as usize;
        if tlen > TAG_MAX {
            return Err(ImageError::Invalid {
                path: sp,
                detail: format!("owner tag length {tlen}"),
            });
        }
        let owner = String::from_utf8_lossy(&h[58..58 + tlen]).into_owned();
        if owner != check.tag {
            return Err(ImageError::Foreign {
                path: sp,
                owner,
                want: check.tag.clone(),
            });
        }
        if u(8) != meta.image_id || u(16) != meta.pages_file_len {
            return Err(ImageError::Altered {
                path: sp,
                what: "its record names another image or pages file length".into(),
            });
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, &check.key);
        let want = meta_tag(&key, &check.tag, meta.image_id, meta.pages_file_len, digest);
        if !same(want.as_ref(), &h[24..56]) {
            return Err(ImageError::Altered {
                path: dir.join(image::META_FILE),
                what:
                    "the metadata does not match its tag (altered, or made for another migration)"
                        .into(),
            });
        }
        r.key = Some(key);
        r.sum = Some((f, sp));
        r.refresh()?;
        Ok(r)
    }

    /// A second reader of the same file (a forked child's pager).
    pub fn try_clone(&self) -> Result<Self, ImageError> {
        Ok(SwapReader {
            pages: self.pages.try_clone().map_err(io(&self.path))?,
            path: self.path.clone(),
            sum: match &self.sum {
                Some((f, p)) => Some((f.try_clone().map_err(io(p))?, p.clone())),
                None => None,
            },
            key: self.key.clone(),
            image_id: self.image_id,
            len: self.len,
            chunks: self.chunks.clone(),
            cache: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Final length of pages.img.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when pages.img holds no page.
    pub fn is_empty(&self) -> bool {
        self.len <= image::PAGES_DATA_OFFSET
    }

    /// Wait until bytes `..end` are written, at most `stall` without progress.
    pub fn wait_for(&mut self, end: u64, stall: std::time::Duration) -> Result<(), ImageError> {
        let mut last = (self.available(), std::time::Instant::now());
        while self.available() < end.min(self.len) {
            std::thread::sleep(std::time::Duration::from_millis(2));
            let a = self.refresh()?;
            if a > last.0 {
                last = (a, std::time::Instant::now());
            } else if last.1.elapsed() >= stall {
                return Err(ImageError::Truncated {
                    path: self.path.clone(),
                    what: format!(
                        "the swap file stopped growing at byte {a} of {} for {} s (the source host died before it was complete?)",
                        self.len,
                        stall.as_secs()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Bytes of pages.img readable now (a prefix of the file).
    pub fn available(&self) -> u64 {
        if self.key.is_none() {
            return self.len;
        }
        self.chunks.last().map_or(0, |c| c.0)
    }

    /// True once the whole file is written.
    pub fn complete(&self) -> bool {
        self.available() >= self.len
    }

    /// Read the chunk entries written since the last look; returns [`Self::available`].
    pub fn refresh(&mut self) -> Result<u64, ImageError> {
        let Some((f, sp)) = &self.sum else {
            return Ok(self.len);
        };
        let mut b = vec![0u8; 64 * ENTRY as usize];
        loop {
            let at = SUM_HEADER + self.chunks.len() as u64 * ENTRY;
            let n = retrying(|| f.read_at(&mut b, at)).map_err(io(sp))?;
            let whole = n / ENTRY as usize;
            for e in b[..whole * ENTRY as usize].chunks_exact(ENTRY as usize) {
                let end = u64::from_le_bytes(e[..8].try_into().unwrap_or([0; 8]));
                let prev = self.chunks.last().map_or(0, |c| c.0);
                if end <= prev || end - prev > CHUNK || end > self.len {
                    return Err(ImageError::Altered {
                        path: sp.clone(),
                        what: format!("chunk {} ends at {end} (after {prev})", self.chunks.len()),
                    });
                }
                let mut t = [0u8; 32];
                t.copy_from_slice(&e[8..]);
                self.chunks.push((end, t));
            }
            if whole < 64 || self.complete() {
                return Ok(self.available());
            }
        }
    }

    /// Read `buf.len()` bytes at `off`; every byte must be [`Self::available`].
    pub fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<(), SwapError> {
        let end = off + buf.len() as u64;
        if end > self.available() {
            return Err(SwapError::NotYet {
                path: self.path.clone(),
                off,
                end,
            });
        }
        if self.key.is_none() {
            let pages = &self.pages;
            return retrying(|| pages.read_exact_at(buf, off))
                .map_err(|e| io(&self.path)(e).into());
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = off + done as u64;
            let i = self.chunks.partition_point(|c| c.0 <= at);
            let (start, cend) = (
                if i == 0 { 0 } else { self.chunks[i - 1].0 },
                self.chunks[i].0,
            );
            if self.cache.as_ref().map(|c| c.0) != Some(i) {
                self.cache = None;
                let mut data = vec![0u8; (cend - start) as usize];
                let pages = &self.pages;
                retrying(|| pages.read_exact_at(&mut data, start)).map_err(io(&self.path))?;
                let key = self.key.as_ref().ok_or_else(|| ImageError::Altered {
                    path: self.path.clone(),
                    what: "no key".into(),
                })?;
                let mut c = chunk_ctx(key, self.image_id, i as u64, start);
                c.update(&data);
                c.update(&cend.to_le_bytes());
                if !same(c.sign().as_ref(), &self.chunks[i].1) {
                    return Err(ImageError::Altered {
                        path: self.path.clone(),
                        what: format!("bytes {start}..{cend} (chunk {i}) do not match their tag"),
                    }
                    .into());
                }
                self.cache = Some((i, data));
            }
            let Some((_, data)) = &self.cache else {
                unreachable!()
            };
            let from = (at - start) as usize;
            let n = (data.len() - from).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&data[from..from + n]);
            done += n;
        }
        Ok(())
    }
}
