//! File contents: one local file ("object") per regular-file inode under `DIR/objects/`.
//!
//! The object is the truth for a file's size, allocated blocks, mtime and atime: writes are
//! plain `pwrite`s (holes stay holes, offsets past 4 GiB work as on the local disk), and a
//! data write needs no metadata transaction. Open handles are kept in a bounded cache.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use wisp_proto::msg::{Ino, Time};

const HANDLE_CACHE: usize = 512;

/// Size, blocks and times of an object.
#[derive(Debug, Clone, Copy)]
pub struct ObjStat {
    pub size: u64,
    pub blocks: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
}

pub struct Objects {
    dir: PathBuf,
    handles: Mutex<HashMap<Ino, Arc<File>>>,
}

impl Objects {
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Objects {
            dir: dir.to_path_buf(),
            handles: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self, ino: Ino) -> PathBuf {
        self.dir
            .join(format!("{:02x}", ino & 0xff))
            .join(format!("{ino:x}"))
    }

    /// The object of `ino`, created empty if it does not exist yet.
    pub fn handle(&self, ino: Ino) -> io::Result<Arc<File>> {
        if let Some(f) = self.handles.lock().unwrap().get(&ino) {
            return Ok(f.clone());
        }
        let p = self.path(ino);
        let f = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // An object is never a symlink: one planted in the data directory is refused
            // (ELOOP), never followed out of it.
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&p)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(p.parent().expect("object paths have a parent"))?;
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&p)?
            }
            Err(e) => return Err(e),
        };
        let f = Arc::new(f);
        let mut h = self.handles.lock().unwrap();
        if h.len() >= HANDLE_CACHE {
            h.clear();
        }
        h.insert(ino, f.clone());
        Ok(f)
    }

    pub fn stat(&self, ino: Ino) -> io::Result<ObjStat> {
        let m = self.handle(ino)?.metadata()?;
        Ok(ObjStat {
            size: m.size(),
            blocks: m.blocks(),
            atime: Time {
                secs: m.atime(),
                nsecs: m.atime_nsec() as u32,
            },
            mtime: Time {
                secs: m.mtime(),
                nsecs: m.mtime_nsec() as u32,
            },
            ctime: Time {
                secs: m.ctime(),
                nsecs: m.ctime_nsec() as u32,
            },
        })
    }

    pub fn read(&self, ino: Ino, offset: u64, size: usize) -> io::Result<Vec<u8>> {
        let f = self.handle(ino)?;
        let mut buf = vec![0u8; size];
        let mut done = 0;
        while done < size {
            let n = f.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    pub fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> io::Result<()> {
        self.handle(ino)?.write_all_at(data, offset)
    }

    /// Append at the object's current end; returns the offset written at.
    /// Callers serialise appends to one inode.
    pub fn append(&self, ino: Ino, data: &[u8]) -> io::Result<u64> {
        let f = self.handle(ino)?;
        let end = f.metadata()?.size();
        f.write_all_at(data, end)?;
        Ok(end)
    }

    pub fn truncate(&self, ino: Ino, size: u64) -> io::Result<()> {
        self.handle(ino)?.set_len(size)
    }

    pub fn sync(&self, ino: Ino) -> io::Result<()> {
        self.handle(ino)?.sync_all()
    }

    pub fn set_times(
        &self,
        ino: Ino,
        atime: Option<Option<Time>>,
        mtime: Option<Option<Time>>,
    ) -> io::Result<()> {
        fn ts(t: Option<Option<Time>>) -> libc::timespec {
            match t {
                None => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                Some(None) => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                },
                Some(Some(t)) => libc::timespec {
                    tv_sec: t.secs,
                    tv_nsec: t.nsecs as i64,
                },
            }
        }
        let f = self.handle(ino)?;
        let times = [ts(atime), ts(mtime)];
        // SAFETY: `f` is an open file for the duration of the call and `times` points to two
        // initialised timespec values, as futimens(2) requires.
        let r = unsafe { libc::futimens(f.as_raw_fd(), times.as_ptr()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn fallocate(&self, ino: Ino, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let f = self.handle(ino)?;
        // SAFETY: plain syscall on a file descriptor we own for the duration of the call.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn remove(&self, ino: Ino) -> io::Result<()> {
        self.handles.lock().unwrap().remove(&ino);
        match std::fs::remove_file(self.path(ino)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every object file's inode number (startup sweep of orphans).
    pub fn all(&self) -> io::Result<Vec<Ino>> {
        let mut out = Vec::new();
        for sub in std::fs::read_dir(&self.dir)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(sub.path())? {
                let f = f?;
                if let Some(ino) = f
                    .file_name()
                    .to_str()
                    .and_then(|s| u64::from_str_radix(s, 16).ok())
                {
                    out.push(ino);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_planted_as_an_object_is_never_followed() {
        let dir = std::env::temp_dir().join(format!("wisp-objects-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let o = Objects::open(&dir).unwrap();
        let p = o.path(0x42);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let secret = dir.join("outside");
        std::fs::write(&secret, b"server secret").unwrap();
        std::os::unix::fs::symlink(&secret, &p).unwrap();
        let e = o.read(0x42, 0, 100).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        assert!(o.write(0x42, 0, b"x").is_err());
        assert_eq!(std::fs::read(&secret).unwrap(), b"server secret");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
