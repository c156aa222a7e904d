//! Readers for the /proc files a dump needs: maps and smaps flags, stat mm fields,
//! status (signals, creds, umask, NSpid), pagemap, fd and fdinfo. Pure parsing plus
//! ordinary file reads; no ptrace here.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Errors reading or parsing a /proc file.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {detail}")]
    Parse { path: PathBuf, detail: String },
}

type Result<T> = std::result::Result<T, ProcError>;

fn path(pid: i32, rel: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{rel}"))
}

/// Read a whole /proc file as a string.
pub fn read_string(pid: i32, rel: &str) -> Result<String> {
    let p = path(pid, rel);
    std::fs::read_to_string(&p).map_err(|source| ProcError::Io { path: p, source })
}

/// Read a whole /proc file as bytes.
pub fn read_bytes(pid: i32, rel: &str) -> Result<Vec<u8>> {
    let p = path(pid, rel);
    std::fs::read(&p).map_err(|source| ProcError::Io { path: p, source })
}

/// readlink of a /proc entry.
pub fn read_link(pid: i32, rel: &str) -> Result<String> {
    let p = path(pid, rel);
    std::fs::read_link(&p)
        .map(|t| t.to_string_lossy().into_owned())
        .map_err(|source| ProcError::Io { path: p, source })
}

/// One parsed maps line with its smaps VmFlags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub inode: u64,
    pub name: String,
    pub vmflags: Vec<String>,
}

impl MapEntry {
    pub fn has_flag(&self, f: &str) -> bool {
        self.vmflags.iter().any(|x| x == f)
    }
}

fn parse_err(p: PathBuf, detail: impl Into<String>) -> ProcError {
    ProcError::Parse {
        path: p,
        detail: detail.into(),
    }
}

/// Parse one maps line.
pub fn parse_maps_line(p: &std::path::Path, line: &str) -> Result<MapEntry> {
    let bad = |what: &str| parse_err(p.to_path_buf(), format!("{what} in line {line:?}"));
    let mut it = line.splitn(6, ' ');
    let range = it.next().ok_or_else(|| bad("no range"))?;
    let perms = it.next().ok_or_else(|| bad("no perms"))?;
    let offset = it.next().ok_or_else(|| bad("no offset"))?;
    let _dev = it.next().ok_or_else(|| bad("no device"))?;
    let inode = it.next().ok_or_else(|| bad("no inode"))?;
    let name = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-').ok_or_else(|| bad("bad range"))?;
    let pb = perms.as_bytes();
    if pb.len() != 4 {
        return Err(bad("bad perms"));
    }
    Ok(MapEntry {
        start: u64::from_str_radix(s, 16).map_err(|_| bad("bad start"))?,
        end: u64::from_str_radix(e, 16).map_err(|_| bad("bad end"))?,
        read: pb[0] == b'r',
        write: pb[1] == b'w',
        exec: pb[2] == b'x',
        shared: pb[3] == b's',
        offset: u64::from_str_radix(offset, 16).map_err(|_| bad("bad offset"))?,
        inode: inode.parse().map_err(|_| bad("bad inode"))?,
        name,
        vmflags: Vec::new(),
    })
}

/// /proc/pid/smaps: every mapping with its VmFlags.
pub fn smaps(pid: i32) -> Result<Vec<MapEntry>> {
    let p = path(pid, "smaps");
    let text = std::fs::read_to_string(&p).map_err(|source| ProcError::Io {
        path: p.clone(),
        source,
    })?;
    let mut out: Vec<MapEntry> = Vec::new();
    for line in text.lines() {
        let first = line.split(' ').next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            out.push(parse_maps_line(&p, line)?);
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(last) = out.last_mut() {
                last.vmflags = flags.split_whitespace().map(str::to_string).collect();
            }
        }
    }
    Ok(out)
}

/// /proc/pid/maps (no flags), for callers that only need the ranges.
pub fn maps(pid: i32) -> Result<Vec<MapEntry>> {
    let p = path(pid, "maps");
    let text = std::fs::read_to_string(&p).map_err(|source| ProcError::Io {
        path: p.clone(),
        source,
    })?;
    text.lines().map(|l| parse_maps_line(&p, l)).collect()
}

/// Fields of /proc/pid/stat after the comm, numbered as in proc(5) (field 3 = state).
pub fn stat_fields(pid: i32) -> Result<Vec<String>> {
    let p = path(pid, "stat");
    let text = std::fs::read_to_string(&p).map_err(|source| ProcError::Io {
        path: p.clone(),
        source,
    })?;
    let close = text
        .rfind(')')
        .ok_or_else(|| parse_err(p.clone(), "no ')' after comm"))?;
    // fields[0] is proc(5) field 3.
    Ok(text[close + 1..]
        .split_whitespace()
        .map(str::to_string)
        .collect())
}

/// proc(5) field number `n` (1-based) of /proc/pid/stat as u64.
pub fn stat_field(pid: i32, fields: &[String], n: usize) -> Result<u64> {
    let s = fields
        .get(n - 3)
        .ok_or_else(|| parse_err(path(pid, "stat"), format!("field {n} missing")))?;
    s.parse().map_err(|_| {
        parse_err(
            path(pid, "stat"),
            format!("field {n} is not a number: {s:?}"),
        )
    })
}

/// /proc/pid/status as (key, value) pairs.
pub fn status(pid: i32) -> Result<Vec<(String, String)>> {
    let text = read_string(pid, "status")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect())
}

/// Look a key up in parsed status.
pub fn status_get<'a>(pid: i32, st: &'a [(String, String)], key: &str) -> Result<&'a str> {
    st.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| parse_err(path(pid, "status"), format!("no {key} line")))
}

/// Parse a hex signal set as printed in status.
pub fn hex_u64(pid: i32, key: &str, v: &str) -> Result<u64> {
    u64::from_str_radix(v, 16)
        .map_err(|_| parse_err(path(pid, "status"), format!("{key} is not hex: {v:?}")))
}

/// Parse whitespace-separated numbers.
pub fn nums<T: std::str::FromStr>(pid: i32, key: &str, v: &str) -> Result<Vec<T>> {
    v.split_whitespace()
        .map(|x| {
            x.parse::<T>().map_err(|_| {
                parse_err(path(pid, "status"), format!("{key} has a bad number {x:?}"))
            })
        })
        .collect()
}

/// pagemap entry bits.
pub const PM_PRESENT: u64 = 1 << 63;
pub const PM_SWAPPED: u64 = 1 << 62;
pub const PM_FILE_OR_SHARED: u64 = 1 << 61;
pub const PM_SOFT_DIRTY: u64 = 1 << 55;

/// Open /proc/pid/pagemap.
pub fn open_pagemap(pid: i32) -> Result<File> {
    let p = path(pid, "pagemap");
    File::open(&p).map_err(|source| ProcError::Io { path: p, source })
}

/// Read pagemap entries for [start, end) into `out` (one u64 per page).
pub fn read_pagemap(pid: i32, f: &File, start: u64, end: u64, out: &mut Vec<u64>) -> Result<()> {
    let n = ((end - start) / 4096) as usize;
    out.clear();
    let mut buf = vec![0u8; n * 8];
    let mut done = 0usize;
    while done < buf.len() {
        let r = f
            .read_at(&mut buf[done..], (start / 4096) * 8 + done as u64)
            .map_err(|source| ProcError::Io {
                path: path(pid, "pagemap"),
                source,
            })?;
        if r == 0 {
            return Err(parse_err(
                path(pid, "pagemap"),
                format!("short read at {start:#x}"),
            ));
        }
        done += r;
    }
    out.extend(buf.chunks_exact(8).map(|c| {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        u64::from_le_bytes(a)
    }));
    Ok(())
}

/// Parsed /proc/pid/fdinfo/N.
#[derive(Debug, Clone, Default)]
pub struct FdInfo {
    pub pos: u64,
    pub flags: u32,
    /// The descriptor holds a file lock (a "lock:" line).
    pub locked: bool,
}

/// Read /proc/pid/fdinfo/fd.
pub fn fdinfo(pid: i32, fd: i32) -> Result<FdInfo> {
    let rel = format!("fdinfo/{fd}");
    let text = read_string(pid, &rel)?;
    let mut info = FdInfo::default();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("pos:") {
            info.pos = v
                .trim()
                .parse()
                .map_err(|_| parse_err(path(pid, &rel), "bad pos"))?;
        } else if line.starts_with("lock:") {
            info.locked = true;
        } else if let Some(v) = line.strip_prefix("flags:") {
            info.flags = u32::from_str_radix(v.trim(), 8)
                .map_err(|_| parse_err(path(pid, &rel), "bad flags"))?;
        }
    }
    Ok(info)
}

/// Open fds of a process, sorted.
pub fn fds(pid: i32) -> Result<Vec<i32>> {
    let p = path(pid, "fd");
    let rd = std::fs::read_dir(&p).map_err(|source| ProcError::Io {
        path: p.clone(),
        source,
    })?;
    let mut v = Vec::new();
    for e in rd {
        let e = e.map_err(|source| ProcError::Io {
            path: p.clone(),
            source,
        })?;
        if let Some(n) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
            v.push(n);
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// Thread ids of a process.
pub fn threads(pid: i32) -> Result<Vec<i32>> {
    let p = path(pid, "task");
    let rd = std::fs::read_dir(&p).map_err(|source| ProcError::Io {
        path: p.clone(),
        source,
    })?;
    let mut v = Vec::new();
    for e in rd.flatten() {
        if let Some(n) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
            v.push(n);
        }
    }
    Ok(v)
}

/// (pid, ppid, one-letter state) of every process of the host (a scan of /proc).
pub fn process_table() -> Vec<(i32, i32, char)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(f) = stat_fields(pid) else {
            continue;
        };
        let state = f.first().and_then(|s| s.chars().next()).unwrap_or('?');
        if let Some(pp) = f.get(1).and_then(|s| s.parse::<i32>().ok()) {
            out.push((pid, pp, state));
        }
    }
    out
}

/// Pids whose parent is `ppid` (scan of /proc, no CONFIG_PROC_CHILDREN needed).
pub fn children_of(ppid: i32) -> Vec<i32> {
    let mut out: Vec<i32> = process_table()
        .into_iter()
        .filter(|(_, pp, _)| *pp == ppid)
        .map(|(p, _, _)| p)
        .collect();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_maps() {
        let p = std::path::Path::new("/proc/1/maps");
        let e = parse_maps_line(p, "7f48ce9d3000-7f48ce9f9000 r-xp 00001000 fe:00 325843                     /usr/lib/ld.so").unwrap();
        assert_eq!(e.start, 0x7f48ce9d3000);
        assert!(e.read && !e.write && e.exec && !e.shared);
        assert_eq!(e.offset, 0x1000);
        assert_eq!(e.name, "/usr/lib/ld.so");
        let e = parse_maps_line(p, "7fff62fe5000-7fff63006000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(e.name, "");
        assert!(parse_maps_line(p, "zz-1 rw-p 0 0 0").is_err());
    }

    #[test]
    fn own_smaps_and_stat() {
        let me = std::process::id() as i32;
        let s = smaps(me).unwrap();
        assert!(s.iter().any(|m| m.name == "[stack]" && m.has_flag("gd")));
        let f = stat_fields(me).unwrap();
        assert!(stat_field(me, &f, 47).unwrap() > 0);
    }
}
