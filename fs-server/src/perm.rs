//! Authorization: who may do what to an inode, decided on the server.
//!
//! Every request that names a user carries a [`Cred`]: the uid, gid and supplementary
//! groups that the (authenticated) host asserts for the process behind it. The server
//! believes the host about its users, except for root: uid 0 from a host that is not
//! trusted for root is squashed to `nobody` ([`NOBODY`]) before anything is checked
//! ([`squash`]). The rules are the kernel's (`generic_permission`, `may_delete`,
//! `setattr_prepare`), without capabilities other than "uid 0 is root":
//!
//! - search (x) on a directory for every lookup in it; write and search to create, remove
//!   or rename in it; with the sticky bit, only the owner of the entry or of the directory
//!   (or root) removes or renames it;
//! - read or write permission to open a file so, and for every read and write;
//!   the file's owner may read and write it whatever its mode (as knfsd does), because a
//!   process keeps the access it opened with: `open(O_CREAT|O_WRONLY, 0444)` then `write`
//!   must work, and writes reach the server after the open, even after a chmod;
//! - chmod only by the owner or root (a non-member's setgid bit is dropped); chown only by
//!   root, chgrp by the owner to one of their groups; a chown by anyone drops setuid and
//!   setgid; explicit times only by the owner or root, "now" also with write permission;
//!   truncate with write permission or as the owner;
//! - xattrs: `user.*` as read/write permission (and on regular files and directories
//!   only), `trusted.*` and `security.*` by root only, `system.*` by the owner or root.

use wisp_proto::msg::{Cred, Kind, SetAttrs, WireError};

use crate::store::InodeRec;

/// The uid and gid a squashed root becomes.
pub const NOBODY: u32 = 65534;

pub const MAY_READ: u16 = 4;
pub const MAY_WRITE: u16 = 2;
pub const MAY_EXEC: u16 = 1;

type R<T> = Result<T, WireError>;

/// The identity to check: `cred` as the host asserts it, with root squashed to nobody
/// unless `root_trusted`.
pub fn squash(cred: &Cred, root_trusted: bool) -> Cred {
    if cred.uid == 0 && !root_trusted {
        Cred {
            uid: NOBODY,
            gid: NOBODY,
            pid: cred.pid,
            groups: vec![],
        }
    } else {
        cred.clone()
    }
}

fn is_root(c: &Cred) -> bool {
    c.uid == 0
}

/// Whether `c` may access `rec` as `want` (an OR of MAY_*), by its permission bits.
pub fn allowed(rec: &InodeRec, c: &Cred, want: u16) -> bool {
    if is_root(c) {
        // Root reads and writes anything; it executes a file only if someone may.
        return want & MAY_EXEC == 0 || rec.kind == Kind::Dir || rec.perm & 0o111 != 0;
    }
    let bits = if c.uid == rec.uid {
        rec.perm >> 6
    } else if c.in_group(rec.gid) {
        rec.perm >> 3
    } else {
        rec.perm
    } & 7;
    bits & want == want
}

fn what(want: u16) -> String {
    let mut s = String::new();
    for (b, n) in [
        (MAY_READ, "read"),
        (MAY_WRITE, "write"),
        (MAY_EXEC, "search"),
    ] {
        if want & b != 0 {
            if !s.is_empty() {
                s.push('+');
            }
            s.push_str(n);
        }
    }
    s
}

fn denied(rec: &InodeRec, c: &Cred, doing: &str) -> WireError {
    WireError::new(
        libc::EACCES,
        format!(
            "permission denied: uid {} (gid {}) may not {doing} (mode {:o}, owner {}:{})",
            c.uid, c.gid, rec.perm, rec.uid, rec.gid
        ),
    )
}

/// EACCES unless `c` may access `rec` as `want`.
pub fn check(rec: &InodeRec, c: &Cred, want: u16) -> R<()> {
    if allowed(rec, c, want) {
        Ok(())
    } else {
        Err(denied(rec, c, &what(want)))
    }
}

/// Reads and writes through an open: permission, or ownership (see the module doc).
pub fn check_io(rec: &InodeRec, c: &Cred, want: u16) -> R<()> {
    if c.uid == rec.uid || allowed(rec, c, want) {
        Ok(())
    } else {
        Err(denied(rec, c, &what(want)))
    }
}

/// Search permission on directory `dir` (a lookup in it).
pub fn check_search(dir: &InodeRec, c: &Cred) -> R<()> {
    check(dir, c, MAY_EXEC)
}

/// Write and search permission on directory `dir` (an entry made or removed in it).
pub fn check_dir_write(dir: &InodeRec, c: &Cred) -> R<()> {
    check(dir, c, MAY_WRITE | MAY_EXEC)
}

/// May `c` remove (or rename away) `victim` from directory `dir`?
pub fn check_delete(dir: &InodeRec, victim: &InodeRec, c: &Cred) -> R<()> {
    check_dir_write(dir, c)?;
    if dir.perm & 0o1000 != 0 && !is_root(c) && c.uid != dir.uid && c.uid != victim.uid {
        return Err(WireError::new(
            libc::EPERM,
            format!(
                "sticky directory: uid {} may not remove or rename an entry owned by {} in a directory owned by {}",
                c.uid, victim.uid, dir.uid
            ),
        ));
    }
    Ok(())
}

/// Check a `SetAttr` and adjust it as the kernel would (dropping setgid/setuid bits);
/// `rec` is the inode before the change. Returns the mode to store, if it changes.
pub fn check_setattr(rec: &InodeRec, c: &Cred, set: &SetAttrs) -> R<Option<u16>> {
    let owner = is_root(c) || c.uid == rec.uid;
    let eperm = |m: String| Err(WireError::new(libc::EPERM, m));
    let mut perm = None;
    if let Some(mode) = set.mode {
        if !owner {
            return eperm(format!(
                "only the owner ({}) or root may chmod; uid {} may not",
                rec.uid, c.uid
            ));
        }
        let mut m = (mode & 0o7777) as u16;
        let gid = set.gid.unwrap_or(rec.gid);
        if !is_root(c) && !c.in_group(gid) && rec.kind != Kind::Dir {
            m &= !0o2000;
        }
        perm = Some(m);
    }
    let uid_changes = set.uid.is_some_and(|u| u != rec.uid);
    let gid_changes = set.gid.is_some_and(|g| g != rec.gid);
    if uid_changes && !is_root(c) {
        return eperm(format!(
            "only root may change a file's owner; uid {} may not",
            c.uid
        ));
    }
    if gid_changes && !is_root(c) {
        let g = set.gid.unwrap_or_default();
        if c.uid != rec.uid || !c.in_group(g) {
            return eperm(format!(
                "uid {} may not change the group to {g}: only the owner, to one of their groups, or root",
                c.uid
            ));
        }
    }
    if (set.uid.is_some() || set.gid.is_some()) && rec.kind != Kind::Dir {
        // chown drops setuid, and setgid when the group may execute (else it marks
        // mandatory locking and stays).
        let base = perm.unwrap_or(rec.perm);
        let mut m = base & !0o4000;
        if base & 0o010 != 0 {
            m &= !0o2000;
        }
        if m != base || perm.is_some() {
            perm = Some(m);
        }
    }
    if set.size.is_some() && !is_root(c) && c.uid != rec.uid && !allowed(rec, c, MAY_WRITE) {
        return Err(denied(rec, c, "truncate"));
    }
    use wisp_proto::msg::SetTime;
    for t in [set.atime, set.mtime].into_iter().flatten() {
        match t {
            SetTime::At(_) if !owner => {
                return eperm(format!(
                    "only the owner ({}) or root may set a file's times; uid {} may not",
                    rec.uid, c.uid
                ))
            }
            SetTime::Now if !owner && !allowed(rec, c, MAY_WRITE) => {
                return Err(denied(rec, c, "set the times of"))
            }
            _ => {}
        }
    }
    Ok(perm)
}

/// The namespace of an xattr name.
enum Ns {
    User,
    Trusted,
    System,
}

fn namespace(name: &[u8]) -> R<Ns> {
    if name.starts_with(b"user.") {
        Ok(Ns::User)
    } else if name.starts_with(b"trusted.") || name.starts_with(b"security.") {
        Ok(Ns::Trusted)
    } else if name.starts_with(b"system.") {
        Ok(Ns::System)
    } else {
        Err(WireError::new(
            libc::EOPNOTSUPP,
            format!(
                "xattr {:?} is in no namespace (user., trusted., security., system.)",
                String::from_utf8_lossy(name)
            ),
        ))
    }
}

/// May `c` read (`write == false`) or set/remove xattr `name` of `rec`?
pub fn check_xattr(rec: &InodeRec, c: &Cred, name: &[u8], write: bool) -> R<()> {
    match namespace(name)? {
        Ns::Trusted if !is_root(c) => Err(WireError::new(
            libc::EPERM,
            format!(
                "only root may use xattr {:?}; uid {} may not",
                String::from_utf8_lossy(name),
                c.uid
            ),
        )),
        Ns::Trusted => Ok(()),
        Ns::System if write && !is_root(c) && c.uid != rec.uid => Err(WireError::new(
            libc::EPERM,
            format!(
                "only the owner ({}) or root may set {:?}",
                rec.uid,
                String::from_utf8_lossy(name)
            ),
        )),
        Ns::System => Ok(()),
        Ns::User => {
            if !matches!(rec.kind, Kind::File | Kind::Dir | Kind::Pipe) {
                return Err(WireError::new(
                    libc::EPERM,
                    "user xattrs exist only on regular files and directories",
                ));
            }
            if write
                && rec.kind == Kind::Dir
                && rec.perm & 0o1000 != 0
                && !is_root(c)
                && c.uid != rec.uid
            {
                return Err(WireError::new(
                    libc::EPERM,
                    "only the owner may set user xattrs on a sticky directory",
                ));
            }
            check(rec, c, if write { MAY_WRITE } else { MAY_READ })
        }
    }
}

/// Whether `c` may see xattr `name` in a listing (trusted.* is root's).
pub fn lists_xattr(c: &Cred, name: &[u8]) -> bool {
    is_root(c) || !(name.starts_with(b"trusted.") || name.starts_with(b"security."))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: Kind, perm: u16, uid: u32, gid: u32) -> InodeRec {
        InodeRec::new(kind, perm, uid, gid, 1)
    }

    fn who(uid: u32, gid: u32, groups: &[u32]) -> Cred {
        Cred {
            uid,
            gid,
            pid: 1,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn owner_group_other_and_supplementary_groups() {
        let f = rec(Kind::File, 0o640, 1000, 100);
        assert!(allowed(&f, &who(1000, 1000, &[]), MAY_READ | MAY_WRITE));
        assert!(allowed(&f, &who(1001, 100, &[]), MAY_READ));
        assert!(!allowed(&f, &who(1001, 100, &[]), MAY_WRITE));
        assert!(allowed(&f, &who(1001, 1001, &[7, 100]), MAY_READ));
        assert!(!allowed(&f, &who(1001, 1001, &[7]), MAY_READ));
        let e = check(&f, &who(1001, 1001, &[]), MAY_READ).unwrap_err();
        assert_eq!(e.errno, libc::EACCES);
        // The owner's bits apply to the owner even when the group's would allow more.
        let g = rec(Kind::File, 0o070, 1000, 100);
        assert!(!allowed(&g, &who(1000, 100, &[]), MAY_READ));
        assert!(check_io(&g, &who(1000, 100, &[]), MAY_READ).is_ok());
    }

    #[test]
    fn root_is_squashed_unless_trusted() {
        let f = rec(Kind::File, 0o600, 1000, 1000);
        assert!(allowed(&f, &squash(&Cred::ROOT, true), MAY_READ));
        let s = squash(&Cred::ROOT, false);
        assert_eq!((s.uid, s.gid), (NOBODY, NOBODY));
        assert!(!allowed(&f, &s, MAY_READ));
        assert!(!allowed(&rec(Kind::File, 0o644, 0, 0), &s, MAY_WRITE));
        // Root executes only what someone may execute.
        assert!(!allowed(
            &rec(Kind::File, 0o644, 0, 0),
            &Cred::ROOT,
            MAY_EXEC
        ));
    }

    #[test]
    fn sticky_directories_protect_other_users_entries() {
        let tmp = rec(Kind::Dir, 0o1777, 0, 0);
        let theirs = rec(Kind::File, 0o666, 1000, 1000);
        let e = check_delete(&tmp, &theirs, &who(1001, 1001, &[])).unwrap_err();
        assert_eq!(e.errno, libc::EPERM);
        assert!(check_delete(&tmp, &theirs, &who(1000, 1000, &[])).is_ok());
        assert!(check_delete(&tmp, &theirs, &Cred::ROOT).is_ok());
        let plain = rec(Kind::Dir, 0o777, 0, 0);
        assert!(check_delete(&plain, &theirs, &who(1001, 1001, &[])).is_ok());
    }

    #[test]
    fn setattr_rules() {
        let f = rec(Kind::File, 0o6755, 1000, 100);
        let other = who(1001, 100, &[]);
        let set = |f: fn(&mut SetAttrs)| {
            let mut s = SetAttrs::default();
            f(&mut s);
            s
        };
        let chmod = set(|s| s.mode = Some(0o777));
        assert_eq!(
            check_setattr(&f, &other, &chmod).unwrap_err().errno,
            libc::EPERM
        );
        assert_eq!(
            check_setattr(&f, &who(1000, 100, &[]), &chmod).unwrap(),
            Some(0o777)
        );
        // A chmod by an owner outside the file's group drops setgid.
        assert_eq!(
            check_setattr(&f, &who(1000, 5, &[]), &set(|s| s.mode = Some(0o2755))).unwrap(),
            Some(0o755)
        );
        let chown = set(|s| s.uid = Some(1001));
        assert_eq!(
            check_setattr(&f, &who(1000, 100, &[]), &chown)
                .unwrap_err()
                .errno,
            libc::EPERM
        );
        assert_eq!(check_setattr(&f, &Cred::ROOT, &chown).unwrap(), Some(0o755));
        let chgrp = set(|s| s.gid = Some(7));
        assert!(check_setattr(&f, &who(1000, 100, &[7]), &chgrp).is_ok());
        assert_eq!(
            check_setattr(&f, &who(1000, 100, &[]), &chgrp)
                .unwrap_err()
                .errno,
            libc::EPERM
        );
        let touch_at = set(|s| s.mtime = Some(wisp_proto::msg::SetTime::At(Default::default())));
        assert_eq!(
            check_setattr(&f, &other, &touch_at).unwrap_err().errno,
            libc::EPERM
        );
        let w = rec(Kind::File, 0o666, 1000, 100);
        let touch_now = set(|s| s.mtime = Some(wisp_proto::msg::SetTime::Now));
        assert!(check_setattr(&w, &other, &touch_now).is_ok());
        assert_eq!(
            check_setattr(&f, &other, &touch_now).unwrap_err().errno,
            libc::EACCES
        );
        let trunc = set(|s| s.size = Some(0));
        assert_eq!(
            check_setattr(&f, &other, &trunc).unwrap_err().errno,
            libc::EACCES
        );
        assert!(check_setattr(&w, &other, &trunc).is_ok());
    }

    #[test]
    fn xattr_namespaces() {
        let f = rec(Kind::File, 0o644, 1000, 100);
        let other = who(1001, 1001, &[]);
        assert!(check_xattr(&f, &other, b"user.x", false).is_ok());
        assert_eq!(
            check_xattr(&f, &other, b"user.x", true).unwrap_err().errno,
            libc::EACCES
        );
        assert_eq!(
            check_xattr(&f, &who(1000, 1, &[]), b"trusted.x", false)
                .unwrap_err()
                .errno,
            libc::EPERM
        );
        assert!(check_xattr(&f, &Cred::ROOT, b"trusted.x", true).is_ok());
        assert_eq!(
            check_xattr(&f, &Cred::ROOT, b"bogus", true)
                .unwrap_err()
                .errno,
            libc::EOPNOTSUPP
        );
        assert!(!lists_xattr(&other, b"trusted.x"));
        assert!(lists_xattr(&other, b"user.x"));
    }
}
