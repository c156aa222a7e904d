//! End-to-end: operating wisp — the metrics endpoints move as work happens, `wisp status`
//! reports a healthy server, a replayed or keyless handshake gets nothing.

use wisp_tests::{sim, Sim};

fn scrape(s: &Sim, host: &str, port: u16) -> std::collections::HashMap<String, f64> {
    let out = s.ok(
        host,
        &format!("bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}; printf \"GET /metrics HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3'"),
    );
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
    out.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with("wisp_"))
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

#[test]
fn metrics_endpoints_move_as_work_happens() {
    let s = sim("metrics", 2);
    let c0 = scrape(&s, "ws1", 9464);
    let s0 = scrape(&s, "srv1", 9465);
    s.ok(
        "ws1",
        "head -c 3000000 /dev/urandom > /wisp/m && cat /wisp/m > /dev/null",
    );
    s.ok("ws2", "cat /wisp/m > /dev/null; echo x >> /wisp/m");
    let c1 = scrape(&s, "ws1", 9464);
    let s1 = scrape(&s, "srv1", 9465);
    assert!(
        c1["wisp_client_written_bytes_total"] >= c0["wisp_client_written_bytes_total"] + 3e6,
        "{c1:?}"
    );
    assert!(c1["wisp_client_rpcs_total"] > c0["wisp_client_rpcs_total"]);
    assert!(c1["wisp_client_rpc_seconds_total"] > 0.0);
    assert!(
        c1["wisp_client_callbacks_total"] >= 1.0,
        "ws2's append should have called ws1 back: {c1:?}"
    );
    assert!(s1["wisp_server_written_bytes_total"] >= s0["wisp_server_written_bytes_total"] + 3e6);
    assert!(s1["wisp_server_requests_total"] > s0["wisp_server_requests_total"]);
    assert!(s1["wisp_server_callbacks_total"] >= 1.0);
    assert!(
        s1["wisp_server_clients"] >= 2.0,
        "both workstations are clients: {s1:?}"
    );
    assert!(
        c1.contains_key("wisp_agent_migrations_out_total")
            && c1.contains_key("wisp_agent_evictions_total")
    );
    let st = s.ok("ws1", &format!("wisp status --server {}", s.server_addr(),));
    assert!(st.contains("up, round trip"), "{st}");
}

/// A recorded handshake replayed on a new connection proves nothing: the server's fresh
/// nonce and ephemeral key make the recorded signature wrong, and the connection is dropped.
#[test]
fn replayed_handshake_is_rejected() {
    let s = sim("replay", 1);
    let addr = s.server_addr();
    let key = wisp_proto::identity::Identity::load(&s.identity_dir("ws1")).unwrap();
    s.in_netns("ws1", move || {
        use std::io::{Read, Write};
        // Record a genuine client's first and third messages through a relay.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let recorded: Vec<Vec<u8>> = rt.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let relay = l.local_addr().unwrap();
            let a2 = addr.clone();
            let rec = tokio::spawn(async move {
                let (mut c, _) = l.accept().await.unwrap();
                let mut srv = tokio::net::TcpStream::connect(&a2).await.unwrap();
                let mut frames = Vec::new();
                // client hello -> server, server hello -> client, proof -> server
                for dir in 0..3 {
                    let (from, to) = if dir % 2 == 0 {
                        (&mut c, &mut srv)
                    } else {
                        (&mut srv, &mut c)
                    };
                    let mut len = [0u8; 4];
                    from.read_exact(&mut len).await.unwrap();
                    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                    from.read_exact(&mut body).await.unwrap();
                    to.write_all(&len).await.unwrap();
                    to.write_all(&body).await.unwrap();
                    if dir % 2 == 0 {
                        frames.push([len.to_vec(), body].concat());
                    }
                }
                frames
            });
            let sock = tokio::net::TcpStream::connect(relay).await.unwrap();
            let _ = wisp_proto::auth::client_handshake(sock, &key, "genuine").await;
            rec.await.unwrap()
        });
        assert_eq!(recorded.len(), 2);
        // Replay them on a fresh connection: the server must drop it after the proof.
        let mut sock = std::net::TcpStream::connect(&addr).unwrap();
        sock.write_all(&recorded[0]).unwrap();
        let mut len = [0u8; 4];
        sock.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        sock.read_exact(&mut body).unwrap();
        sock.write_all(&recorded[1]).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut rest = Vec::new();
        let n = sock.read_to_end(&mut rest).unwrap_or(0);
        assert_eq!(n, 0, "the server answered a replayed handshake");
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    let log = std::fs::read_to_string(s.log_path("srv1")).unwrap();
    assert!(
        log.contains("signature over the handshake does not verify"),
        "{log}"
    );
}
