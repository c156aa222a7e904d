//! A Prometheus metrics endpoint: `GET /metrics` in the text exposition format.
//!
//! Deliberately tiny (one request per connection, HTTP/1.0 style): the daemons expose a
//! handful of counters, and a scraper is the only client.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One metric: name, help, type ("counter" or "gauge"), value.
pub type Sample = (&'static str, &'static str, &'static str, f64);

/// Render samples in the exposition format.
pub fn render(samples: &[Sample]) -> String {
    let mut s = String::new();
    for (name, help, kind, v) in samples {
        s += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n");
    }
    s
}

/// Serve `GET /metrics` on `addr` until the runtime stops; other paths get 404.
pub async fn serve(
    addr: String,
    samples: Arc<dyn Fn() -> Vec<Sample> + Send + Sync>,
) -> std::io::Result<()> {
    let l = tokio::net::TcpListener::bind(&addr).await?;
    tracing::info!(%addr, "metrics endpoint at /metrics");
    loop {
        let (mut sock, _) = match l.accept().await {
            Ok(x) => x,
            Err(_) => continue,
        };
        let samples = samples.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                ("200 OK", render(&samples()))
            } else {
                ("404 Not Found", "try GET /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
