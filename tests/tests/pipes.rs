//! End-to-end: a cluster pipe behaves like a local FIFO. The same table of cases (data then
//! EOF, EPIPE once the reader is gone, ENXIO for a non-blocking write open without a
//! reader, EOF without writers, EAGAIN while a writer holds it empty, EOF only after the
//! last writer, whole PIPE_BUF-sized records from two writers) runs against `mkfifo` in
//! /tmp and `wisp mkpipe` in /wisp, and the two tables must match line by line.

use wisp_tests::sim;

const CASES: &str = include_str!("data/fifo_cases.py");

#[test]
fn cluster_pipes_match_a_local_fifo_case_by_case() {
    let s = sim("fifo", 1);
    std::fs::write("/tmp/wisp-fifo-cases.py", CASES).unwrap();
    let local = s.ok(
        "ws1",
        "d=$(mktemp -d) && timeout 60 python3 /tmp/wisp-fifo-cases.py mkfifo $d; rm -rf $d",
    );
    let cluster = s.ok(
        "ws1",
        "mkdir -p /wisp/fifo && timeout 60 python3 /tmp/wisp-fifo-cases.py 'wisp mkpipe' /wisp/fifo",
    );
    let _ = std::fs::remove_file("/tmp/wisp-fifo-cases.py");
    assert_eq!(
        local.lines().count(),
        7,
        "the local table is incomplete:\n{local}"
    );
    assert!(
        !local.contains("hung"),
        "a case hung on a local FIFO:\n{local}"
    );
    assert!(
        local.contains("eof_only_after_the_last_writer: b'ab' then EOF"),
        "{local}"
    );
    for (l, c) in local.lines().zip(cluster.lines()) {
        assert_eq!(c, l, "a cluster pipe differs from a local FIFO");
    }
    assert_eq!(cluster.lines().count(), 7, "{cluster}");
}
