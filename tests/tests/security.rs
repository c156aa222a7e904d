//! End-to-end: frames after the handshake are sealed. A client that completed a genuine
//! handshake (it holds the cluster key) but then sends a frame with a wrong tag, or replays a
//! frame it sent before, is disconnected before the request is parsed, and the server log
//! names it; the request never runs, and `/wisp` on the workstations keeps working.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use wisp_proto::auth::seal::SealedCodec;
use wisp_proto::msg::{Cred, Message, Request, Response, ROOT_INO};
use wisp_tests::{sim, Sim};

fn encode(m: &Message) -> Vec<u8> {
    postcard::to_allocvec(m).unwrap()
}

fn mkdir(id: u64, name: &str) -> Message {
    Message::Call {
        id,
        req: Request::Mkdir {
            cred: Cred::ROOT,
            parent: ROOT_INO,
            name: name.as_bytes().to_vec(),
            mode: 0o755,
        },
    }
}

/// Authenticate for real from `host`'s network namespace, as client `name`; returns the raw
/// socket (it stays in that namespace) and the session's codec.
fn authenticate(s: &Sim, host: &str, name: &'static str) -> (TcpStream, SealedCodec) {
    let addr = s.server_addr();
    let key = wisp_proto::identity::Identity::load(&s.identity_dir("ws1")).unwrap();
    let (sock, codec) = s.in_netns(host, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let (framed, _session) = wisp_proto::auth::client_handshake(sock, &key, name)
                .await
                .expect("genuine handshake");
            let parts = framed.into_parts();
            assert!(
                parts.read_buf.is_empty(),
                "nothing follows the Welcome unasked"
            );
            (parts.io.into_std().unwrap(), parts.codec)
        })
    });
    sock.set_nonblocking(false).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    (sock, codec)
}

/// Read one whole wire frame (length prefix included), or `None` once the server closed.
fn read_frame(sock: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    match sock.read_exact(&mut len) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            panic!("the server neither answered nor closed the connection within 15 s")
        }
        Err(_) => return None,
    }
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    sock.read_exact(&mut body).ok()?;
    Some([len.to_vec(), body].concat())
}

/// A genuine call on a sealed connection, and its reply.
fn call(sock: &mut TcpStream, codec: &mut SealedCodec, m: &Message) -> Message {
    sock.write_all(&codec.seal_frame(&encode(m)).unwrap())
        .unwrap();
    let reply = read_frame(sock).expect("the server closed a genuine connection");
    postcard::from_bytes(
        &codec
            .open_frame(&reply)
            .expect("the server's reply verifies"),
    )
    .unwrap()
}

/// Whether the server closes `sock` (EOF or reset) within 15 s, reading whatever comes.
fn closed_by_server(sock: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn forged_and_replayed_frames_on_an_authenticated_connection_are_refused() {
    let s = sim("seal", 1);
    s.ok("ws1", "echo before > /wisp/before && cat /wisp/before");

    // 1. A key holder whose frame carries a wrong tag: dropped, and the request never runs.
    let (mut sock, mut codec) = authenticate(&s, "ws1", "forger");
    match call(
        &mut sock,
        &mut codec,
        &Message::Call {
            id: 1,
            req: Request::Ping,
        },
    ) {
        Message::Reply {
            id: 1,
            resp: Ok(Response::Pong),
        } => {}
        other => panic!("a sealed ping got {other:?}"),
    }
    let mut forged = codec.seal_frame(&encode(&mkdir(2, "forged"))).unwrap();
    let last = forged.len() - 1;
    forged[last] ^= 1; // one bit of the tag
    sock.write_all(&forged).unwrap();
    assert!(
        closed_by_server(&mut sock),
        "the server kept a connection that sent a forged frame"
    );

    // 2. A frame replayed on its own connection: the first copy runs, the copy closes the
    //    connection and does not run again (the directory removed in between stays gone).
    let (mut sock, mut codec) = authenticate(&s, "ws1", "replayer");
    let frame = codec.seal_frame(&encode(&mkdir(1, "replayed"))).unwrap();
    sock.write_all(&frame).unwrap();
    let reply = read_frame(&mut sock).expect("reply to the genuine mkdir");
    match postcard::from_bytes(&codec.open_frame(&reply).unwrap()).unwrap() {
        Message::Reply {
            id: 1,
            resp: Ok(Response::Entry(_)),
        } => {}
        other => panic!("the genuine mkdir got {other:?}"),
    }
    s.ok("ws1", "test -d /wisp/replayed");
    // Removed on the same connection (a workstation's rmdir would wait for this raw client
    // to answer the server's invalidation callback, which it never does).
    let rmdir = Request::Rmdir {
        cred: Cred::ROOT,
        parent: ROOT_INO,
        name: b"replayed".to_vec(),
    };
    match call(&mut sock, &mut codec, &Message::Call { id: 2, req: rmdir }) {
        Message::Reply { id: 2, resp: Ok(_) } => {}
        other => panic!("the genuine rmdir got {other:?}"),
    }
    sock.write_all(&frame).unwrap();
    assert!(
        closed_by_server(&mut sock),
        "the server kept a connection that replayed a frame"
    );

    // 3. A frame altered in flight (one bit of the encrypted payload):
    //    refused the same way.
    let (mut sock, mut codec) = authenticate(&s, "ws1", "tamperer");
    let mut altered = codec.seal_frame(&encode(&mkdir(1, "forged"))).unwrap();
    let at = altered.len() - wisp_proto::auth::seal::TAG_LEN - 8; // inside the payload, before the tag
    altered[at] ^= 0x20;
    sock.write_all(&altered).unwrap();
    assert!(
        closed_by_server(&mut sock),
        "the server kept a connection that sent an altered frame"
    );

    // Nothing the refused frames asked for happened, and the file system serves as before.
    std::thread::sleep(Duration::from_millis(300));
    s.ok("ws1", "ls -a /wisp > /dev/null; test ! -e /wisp/forged && test ! -e /wisp/replayed && test ! -e /wisp/Forged");
    assert_eq!(
        s.ok(
            "ws1",
            "echo after > /wisp/after && cat /wisp/before /wisp/after"
        ),
        "before\nafter\n"
    );

    // The server said why, naming each client, and only for these three.
    let log = std::fs::read_to_string(s.log_path("srv1")).unwrap();
    for who in ["forger", "replayer", "tamperer"] {
        assert!(
            log.lines()
                .any(|l| l.contains("frame authentication failed") && l.contains(who)),
            "no 'frame authentication failed' line naming {who} in the server log:\n{log}"
        );
    }
    assert_eq!(
        log.matches("frame authentication failed").count(),
        3,
        "{log}"
    );
}
