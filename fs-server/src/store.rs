//! Durable metadata of one domain: inodes, directory entries and xattrs in redb.
//!
//! Tables:
//! - `inodes`:  ino -> postcard [`InodeRec`]
//! - `names`:   (dir ino, name) -> (child ino, cookie)      — lookup
//! - `cookies`: (dir ino, cookie) -> (name, child ino)      — readdir in stable order
//! - `xattrs`:  (ino, name) -> value
//! - `meta`:    "next_ino" -> u64
//!
//! Each mutation is one redb transaction committed with `Durability::None`: no disk sync
//! per change (a sync per create or unlink made small-file work disk-bound). A background
//! flusher ([`Store::sync`] every [`FLUSH_EVERY`] while anything changed) makes them
//! durable, and so does every client fsync, which the server answers only after an
//! `Immediate` commit. So an acknowledged fsync is on disk, metadata included; a crash may
//! lose the metadata changes of the last second that nobody fsynced — what POSIX allows,
//! and redb stays consistent either way (objects of lost creates are swept at start).
//!
//! File sizes, mtimes and allocated blocks of regular files live in their data object
//! (see `objects.rs`), so a data write never needs a metadata transaction.

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use wisp_proto::msg::{Ino, Kind, Time, ROOT_INO};

const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
const NAMES: TableDefinition<(u64, &[u8]), (u64, u64)> = TableDefinition::new("names");
const COOKIES: TableDefinition<(u64, u64), (&[u8], u64)> = TableDefinition::new("cookies");
const XATTRS: TableDefinition<(u64, &[u8]), &[u8]> = TableDefinition::new("xattrs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("metadata database error: {0}")]
    Db(String),
    #[error("corrupt inode record {ino}: {msg}")]
    Corrupt { ino: Ino, msg: String },
    #[error("{0}")]
    Errno(i32, String),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.to_string()) }
        }
    )*};
}
db_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub fn errno(e: i32, msg: impl Into<String>) -> StoreError {
    StoreError::Errno(e, msg.into())
}

/// An inode's metadata as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InodeRec {
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub nlink: u32,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub version: u64,
    /// Directories: the parent directory (root: itself).
    pub parent: Ino,
    /// Directories: next readdir cookie to hand out (cookies 1 and 2 are "." and "..").
    pub next_cookie: u64,
    /// Symlinks: the target.
    pub target: Vec<u8>,
    /// Directories: number of entries.
    pub entries: u64,
}

impl InodeRec {
    pub fn new(kind: Kind, perm: u16, uid: u32, gid: u32, parent: Ino) -> Self {
        let now = Time::now();
        InodeRec {
            kind,
            perm,
            uid,
            gid,
            rdev: 0,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            atime: now,
            mtime: now,
            ctime: now,
            version: 1,
            parent,
            next_cookie: 3,
            target: Vec::new(),
            entries: 0,
        }
    }
}

/// How often changes not yet synced are made durable in the background.
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The metadata database of one domain.
/// How far the next inode number jumps each time a store is opened. More than a server
/// can allocate between two durable commits (one second), so no number handed out before a
/// crash is handed out again after it.
pub const INO_SKIP_ON_OPEN: u64 = 1 << 20;

pub struct Store {
    db: Database,
    /// Commits since the last durable one.
    dirty: std::sync::atomic::AtomicBool,
}

/// A write transaction with typed helpers; commit with [`Txn::commit`].
pub struct Txn<'a> {
    tx: redb::WriteTransaction,
    dirty: &'a std::sync::atomic::AtomicBool,
}

impl Store {
    /// Open (or create) the database at `path`, creating the root directory if new.
    pub fn open(path: &std::path::Path) -> Result<Self, StoreError> {
        let db = Database::create(path)?;
        let store = Store {
            db,
            dirty: std::sync::atomic::AtomicBool::new(false),
        };
        let mut t = store.begin()?;
        {
            let mut inodes = t.tx.open_table(INODES)?;
            t.tx.open_table(NAMES)?;
            t.tx.open_table(COOKIES)?;
            t.tx.open_table(XATTRS)?;
            let mut meta = t.tx.open_table(META)?;
            if inodes.get(ROOT_INO)?.is_none() {
                let root = InodeRec::new(Kind::Dir, 0o755, 0, 0, ROOT_INO);
                inodes.insert(ROOT_INO, postcard::to_allocvec(&root).unwrap().as_slice())?;
                meta.insert("next_ino", ROOT_INO + 1)?;
            } else {
                // Inode numbers handed out after the last durable commit may have been lost
                // in a crash, while clients still hold delayed writes for them: never hand
                // those numbers out again (skip far ahead, durably).
                let next = meta
                    .get("next_ino")?
                    .map(|v| v.value())
                    .unwrap_or(ROOT_INO + 1);
                meta.insert("next_ino", next + INO_SKIP_ON_OPEN)?;
            }
        }
        t.tx.set_durability(Durability::Immediate);
        t.tx.commit()?;
        Ok(store)
    }

    pub fn begin(&self) -> Result<Txn<'_>, StoreError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::None);
        Ok(Txn {
            tx,
            dirty: &self.dirty,
        })
    }

    /// Make every committed change durable on disk.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.dirty.store(false, std::sync::atomic::Ordering::SeqCst);
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate);
        tx.commit()?;
        Ok(())
    }

    /// [`Store::sync`] if anything changed since the last durable commit.
    pub fn sync_if_dirty(&self) -> Result<(), StoreError> {
        if self.dirty.load(std::sync::atomic::Ordering::SeqCst) {
            self.sync()?;
        }
        Ok(())
    }

    pub fn get(&self, ino: Ino) -> Result<InodeRec, StoreError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(INODES)?;
        let v = t
            .get(ino)?
            .ok_or_else(|| errno(libc::ENOENT, format!("no inode {ino}")))?;
        decode(ino, v.value())
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Option<Ino>, StoreError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(NAMES)?;
        Ok(t.get((parent, name))?.map(|v| v.value().0))
    }

    /// Entries of `dir` with cookie > `after`, at most `max`.
    pub fn list(
        &self,
        dir: Ino,
        after: u64,
        max: usize,
    ) -> Result<Vec<(u64, Vec<u8>, Ino)>, StoreError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(COOKIES)?;
        let mut out = Vec::new();
        for item in t.range((dir, after + 1)..=(dir, u64::MAX))? {
            let (k, v) = item?;
            let (name, child) = v.value();
            out.push((k.value().1, name.to_vec(), child));
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    pub fn get_xattr(&self, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(XATTRS)?;
        Ok(t.get((ino, name))?.map(|v| v.value().to_vec()))
    }

    pub fn list_xattrs(&self, ino: Ino) -> Result<Vec<Vec<u8>>, StoreError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(XATTRS)?;
        let mut out = Vec::new();
        for item in t.range((ino, &[][..])..)? {
            let (k, _) = item?;
            let (i, name) = k.value();
            if i != ino {
                break;
            }
            out.push(name.to_vec());
        }
        Ok(out)
    }

    /// Every inode number with its record (startup sweeps).
    pub fn all_inodes(&self) -> Result<Vec<(Ino, InodeRec)>, StoreError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(INODES)?;
        let mut out = Vec::with_capacity(t.len()? as usize);
        for item in t.iter()? {
            let (k, v) = item?;
            out.push((k.value(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    pub fn inode_count(&self) -> Result<u64, StoreError> {
        let r = self.db.begin_read()?;
        Ok(r.open_table(INODES)?.len()?)
    }
}

fn decode(ino: Ino, bytes: &[u8]) -> Result<InodeRec, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        ino,
        msg: e.to_string(),
    })
}

impl Txn<'_> {
    pub fn commit(self) -> Result<(), StoreError> {
        self.tx.commit()?;
        self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    pub fn get(&self, ino: Ino) -> Result<InodeRec, StoreError> {
        let t = self.tx.open_table(INODES)?;
        let v = t
            .get(ino)?
            .ok_or_else(|| errno(libc::ENOENT, format!("no inode {ino}")))?;
        decode(ino, v.value())
    }

    pub fn put(&mut self, ino: Ino, rec: &InodeRec) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(INODES)?;
        t.insert(
            ino,
            postcard::to_allocvec(rec)
                .expect("records encode")
                .as_slice(),
        )?;
        Ok(())
    }

    pub fn remove_inode(&mut self, ino: Ino) -> Result<(), StoreError> {
        self.tx.open_table(INODES)?.remove(ino)?;
        let names: Vec<Vec<u8>> = {
            let t = self.tx.open_table(XATTRS)?;
            let mut v = Vec::new();
            for item in t.range((ino, &[][..])..)? {
                let (k, _) = item?;
                let (i, n) = k.value();
                if i != ino {
                    break;
                }
                v.push(n.to_vec());
            }
            v
        };
        let mut t = self.tx.open_table(XATTRS)?;
        for n in names {
            t.remove((ino, n.as_slice()))?;
        }
        Ok(())
    }

    /// Allocate an inode number (numbers are never reused, also across crashes: see
    /// [`INO_SKIP_ON_OPEN`]).
    pub fn alloc_ino(&mut self) -> Result<Ino, StoreError> {
        let mut m = self.tx.open_table(META)?;
        let next = m
            .get("next_ino")?
            .map(|v| v.value())
            .unwrap_or(ROOT_INO + 1);
        m.insert("next_ino", next + 1)?;
        Ok(next)
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Option<(Ino, u64)>, StoreError> {
        let t = self.tx.open_table(NAMES)?;
        let v = t.get((parent, name))?.map(|v| v.value());
        Ok(v)
    }

    /// Add `name -> child` in `dir` (whose record is updated and returned by the caller).
    pub fn link(
        &mut self,
        dir: Ino,
        dir_rec: &mut InodeRec,
        name: &[u8],
        child: Ino,
    ) -> Result<(), StoreError> {
        let cookie = dir_rec.next_cookie;
        dir_rec.next_cookie += 1;
        dir_rec.entries += 1;
        self.tx
            .open_table(NAMES)?
            .insert((dir, name), (child, cookie))?;
        self.tx
            .open_table(COOKIES)?
            .insert((dir, cookie), (name, child))?;
        Ok(())
    }

    /// Remove `name` from `dir`; returns the child it named.
    pub fn unlink(
        &mut self,
        dir: Ino,
        dir_rec: &mut InodeRec,
        name: &[u8],
    ) -> Result<Ino, StoreError> {
        let (child, cookie) = self
            .tx
            .open_table(NAMES)?
            .remove((dir, name))?
            .map(|v| v.value())
            .ok_or_else(|| errno(libc::ENOENT, "no such entry"))?;
        self.tx.open_table(COOKIES)?.remove((dir, cookie))?;
        dir_rec.entries = dir_rec.entries.saturating_sub(1);
        Ok(child)
    }

    pub fn set_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.tx.open_table(XATTRS)?.insert((ino, name), value)?;
        Ok(())
    }

    pub fn get_xattr(&self, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let t = self.tx.open_table(XATTRS)?;
        let v = t.get((ino, name))?.map(|v| v.value().to_vec());
        Ok(v)
    }

    pub fn remove_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<bool, StoreError> {
        Ok(self.tx.open_table(XATTRS)?.remove((ino, name))?.is_some())
    }
}
