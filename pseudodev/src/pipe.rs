//! The cluster pipe: POSIX FIFO semantics for readers and writers on any hosts.
//!
//! - a bounded buffer ([`CAPACITY`]) with back-pressure: writers wait for room;
//! - reads return what is there (at most the request), wait while the buffer is empty and a
//!   writer exists, and return end of file (0 bytes) once the last writer has closed;
//! - a write with no reader left fails with EPIPE (the client also raises SIGPIPE);
//! - writes of at most [`PIPE_BUF`] bytes are atomic: never split or interleaved;
//! - opening for reading waits for a writer and opening for writing waits for a reader,
//!   unless non-blocking (then a write-open without readers is ENXIO, as for a FIFO) — but
//!   only until the other end has been opened once: a migrated process that reopens its
//!   end after the peer has gone must not wait forever (it sees EOF or EPIPE instead,
//!   exactly what it would have seen had it not moved).
//!
//! Every wait is bounded by the caller's deadline; a call that reaches it returns
//! [`PipeError::Again`] having done nothing (or, for a long write, the bytes done so far),
//! so a server thread is never held forever and the client simply asks again.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// Bytes a pipe buffers before writers wait (as Linux's default pipe).
pub const CAPACITY: usize = 65536;
/// Writes up to this size are atomic.
pub const PIPE_BUF: usize = 4096;

/// Outcomes that are not data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PipeError {
    #[error("pipe has no reader (EPIPE)")]
    Broken,
    #[error("would block; try again")]
    Again,
    #[error("no reader has the pipe open (ENXIO)")]
    NoReader,
}

impl PipeError {
    pub fn errno(self) -> i32 {
        match self {
            PipeError::Broken => libc::EPIPE,
            PipeError::Again => libc::EAGAIN,
            PipeError::NoReader => libc::ENXIO,
        }
    }
}

#[derive(Default)]
struct State {
    buf: VecDeque<u8>,
    readers: u32,
    writers: u32,
    /// Opens ever made for writing (a reader that opened before any writer waits for one).
    opened_writers: u64,
    /// Opens ever made for reading.
    opened_readers: u64,
}

/// One cluster pipe.
#[derive(Default)]
pub struct Pipe {
    st: Mutex<State>,
    cv: Condvar,
}

impl Pipe {
    pub fn new() -> Self {
        Self::default()
    }

    fn wait<'a>(
        &self,
        g: std::sync::MutexGuard<'a, State>,
        deadline: Instant,
    ) -> Option<std::sync::MutexGuard<'a, State>> {
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        Some(self.cv.wait_timeout(g, deadline - now).unwrap().0)
    }

    /// Register an open for reading; unless `nonblock`, wait for a writer to exist.
    /// The open counts even when the wait runs out (the caller retries with [`Pipe::await_writer`]).
    pub fn open_read(&self, nonblock: bool, deadline: Instant) -> Result<(), PipeError> {
        let mut g = self.st.lock().unwrap();
        g.readers += 1;
        g.opened_readers += 1;
        self.cv.notify_all();
        if nonblock {
            return Ok(());
        }
        drop(g);
        self.await_writer(deadline)
    }

    /// Wait until some writer has the pipe open (or has had it open since data is waiting).
    pub fn await_writer(&self, deadline: Instant) -> Result<(), PipeError> {
        let mut g = self.st.lock().unwrap();
        while g.opened_writers == 0 && g.buf.is_empty() {
            g = self.wait(g, deadline).ok_or(PipeError::Again)?;
        }
        Ok(())
    }

    /// Register an open for writing; unless `nonblock`, wait for a reader.
    pub fn open_write(&self, nonblock: bool, deadline: Instant) -> Result<(), PipeError> {
        let mut g = self.st.lock().unwrap();
        if nonblock && g.readers == 0 {
            return Err(PipeError::NoReader);
        }
        g.writers += 1;
        g.opened_writers += 1;
        self.cv.notify_all();
        if nonblock {
            return Ok(());
        }
        drop(g);
        self.await_reader(deadline)
    }

    /// Wait until some reader has the pipe open.
    pub fn await_reader(&self, deadline: Instant) -> Result<(), PipeError> {
        let mut g = self.st.lock().unwrap();
        while g.opened_readers == 0 {
            g = self.wait(g, deadline).ok_or(PipeError::Again)?;
        }
        Ok(())
    }

    pub fn close(&self, read: bool, write: bool) {
        let mut g = self.st.lock().unwrap();
        if read {
            g.readers = g.readers.saturating_sub(1);
            if g.readers == 0 {
                g.buf.clear(); // like a FIFO: unread data goes when the last reader does
            }
        }
        if write {
            g.writers = g.writers.saturating_sub(1);
        }
        self.cv.notify_all();
    }

    /// Read at most `max` bytes. Empty result = end of file.
    pub fn read(
        &self,
        max: usize,
        nonblock: bool,
        deadline: Instant,
    ) -> Result<Vec<u8>, PipeError> {
        let mut g = self.st.lock().unwrap();
        loop {
            if !g.buf.is_empty() {
                let n = max.min(g.buf.len());
                let out: Vec<u8> = g.buf.drain(..n).collect();
                self.cv.notify_all();
                return Ok(out);
            }
            if g.writers == 0 {
                return Ok(Vec::new());
            }
            if nonblock {
                return Err(PipeError::Again);
            }
            g = self.wait(g, deadline).ok_or(PipeError::Again)?;
        }
    }

    /// Write `data`; returns the bytes accepted (all of them unless the deadline came in the
    /// middle of a write longer than PIPE_BUF).
    pub fn write(
        &self,
        data: &[u8],
        nonblock: bool,
        deadline: Instant,
    ) -> Result<usize, PipeError> {
        let mut g = self.st.lock().unwrap();
        let mut done = 0;
        loop {
            if g.readers == 0 {
                return if done > 0 {
                    Ok(done)
                } else {
                    Err(PipeError::Broken)
                };
            }
            let room = CAPACITY - g.buf.len();
            let left = data.len() - done;
            let atomic = data.len() <= PIPE_BUF;
            if (atomic && room >= left) || (!atomic && room > 0) {
                let n = room.min(left);
                g.buf.extend(&data[done..done + n]);
                done += n;
                self.cv.notify_all();
                if done == data.len() {
                    return Ok(done);
                }
                continue;
            }
            if nonblock {
                return if done > 0 {
                    Ok(done)
                } else {
                    Err(PipeError::Again)
                };
            }
            match self.wait(g, deadline) {
                Some(ng) => g = ng,
                None => {
                    return if done > 0 {
                        Ok(done)
                    } else {
                        Err(PipeError::Again)
                    }
                }
            }
        }
    }

    /// poll(2) bits that hold for an open that reads (`read`) and/or writes (`write`):
    /// POLLIN with data waiting; POLLHUP for a reader once every writer has gone (after
    /// one came); POLLOUT with room for an atomic write; POLLERR for a writer with no reader.
    pub fn ready(&self, read: bool, write: bool) -> u32 {
        readiness(&self.st.lock().unwrap(), read, write)
    }

    /// Wait until one of `events` (or POLLERR/POLLHUP) holds, at most until `deadline`;
    /// returns the bits that hold then.
    pub fn wait_ready(&self, read: bool, write: bool, events: u32, deadline: Instant) -> u32 {
        let want = events | (libc::POLLERR | libc::POLLHUP) as u32;
        let mut g = self.st.lock().unwrap();
        loop {
            let r = readiness(&g, read, write);
            if r & want != 0 {
                return r;
            }
            match self.wait(g, deadline) {
                Some(ng) => g = ng,
                None => return r,
            }
        }
    }

    /// Bytes waiting in the buffer.
    pub fn buffered(&self) -> usize {
        self.st.lock().unwrap().buf.len()
    }

    /// (readers, writers) with the pipe open.
    pub fn opens(&self) -> (u32, u32) {
        let g = self.st.lock().unwrap();
        (g.readers, g.writers)
    }
}

fn readiness(g: &State, read: bool, write: bool) -> u32 {
    let mut r = 0;
    if read {
        if !g.buf.is_empty() {
            r |= libc::POLLIN | libc::POLLRDNORM;
        }
        if g.writers == 0 && g.opened_writers > 0 {
            r |= libc::POLLHUP;
        }
    }
    if write {
        if g.readers == 0 {
            r |= libc::POLLERR;
        } else if CAPACITY - g.buf.len() >= PIPE_BUF {
            r |= libc::POLLOUT | libc::POLLWRNORM;
        }
    }
    r as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn fifo_order_eof_and_epipe() {
        let p = Pipe::new();
        p.open_read(true, soon()).unwrap();
        p.open_write(false, soon()).unwrap();
        assert_eq!(p.write(b"hello ", false, soon()), Ok(6));
        assert_eq!(p.write(b"world", false, soon()), Ok(5));
        assert_eq!(p.read(3, false, soon()).unwrap(), b"hel");
        assert_eq!(p.read(100, false, soon()).unwrap(), b"lo world");
        p.close(false, true);
        assert_eq!(
            p.read(100, false, soon()).unwrap(),
            b"",
            "EOF after the last writer"
        );
        p.open_write(false, soon()).unwrap();
        p.close(true, false);
        assert_eq!(p.write(b"x", false, soon()), Err(PipeError::Broken));
    }

    #[test]
    fn back_pressure_and_atomic_small_writes() {
        let p = Arc::new(Pipe::new());
        p.open_read(true, soon()).unwrap();
        p.open_write(false, soon()).unwrap();
        p.open_write(false, soon()).unwrap();
        let total = 4 * 1024 * 1024;
        let writers: Vec<_> = (0..2u8)
            .map(|w| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let rec = vec![b'a' + w; PIPE_BUF];
                    let mut sent = 0;
                    while sent < total / 2 {
                        sent += p.write(&rec, false, soon()).unwrap();
                        assert!(p.buffered() <= CAPACITY);
                    }
                    p.close(false, true);
                })
            })
            .collect();
        let mut got = Vec::new();
        loop {
            let d = p.read(PIPE_BUF, false, soon()).unwrap();
            if d.is_empty() {
                break;
            }
            got.extend(d);
        }
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(got.len(), total);
        for chunk in got.chunks(PIPE_BUF) {
            assert!(
                chunk.iter().all(|b| *b == chunk[0]),
                "a PIPE_BUF write was interleaved"
            );
        }
    }

    #[test]
    fn readiness_follows_the_buffer_and_the_ends() {
        let p = Arc::new(Pipe::new());
        p.open_read(true, soon()).unwrap();
        p.open_write(true, soon()).unwrap();
        let pollin = libc::POLLIN as u32;
        assert_eq!(p.ready(true, false) & pollin, 0);
        assert_ne!(p.ready(false, true) & libc::POLLOUT as u32, 0);
        let q = p.clone();
        let t = std::thread::spawn(move || q.wait_ready(true, false, pollin, soon()));
        p.write(b"x", false, soon()).unwrap();
        assert_ne!(
            t.join().unwrap() & pollin,
            0,
            "a waiting poll wakes on data"
        );
        p.close(false, true);
        assert_ne!(p.ready(true, false) & libc::POLLHUP as u32, 0);
        p.close(true, false);
        assert_ne!(p.ready(false, true) & libc::POLLERR as u32, 0);
    }

    #[test]
    fn waits_are_bounded() {
        let p = Pipe::new();
        let t = Instant::now() + Duration::from_millis(50);
        assert_eq!(p.open_read(false, t), Err(PipeError::Again));
        assert_eq!(p.open_write(true, t), Ok(()));
        p.close(false, true);
        assert_eq!(
            p.read(10, false, Instant::now() + Duration::from_millis(50)),
            Ok(vec![])
        );
        let q = Pipe::new();
        assert_eq!(q.open_write(true, t), Err(PipeError::NoReader));
    }
}
