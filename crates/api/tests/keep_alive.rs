//! A request answered without its body being read must not leave the client a connection that
//! the server closes silently (see `openims_api::conn`).

use openims_core::{Service, ServiceConfig};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn start() -> (std::net::SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::open(ServiceConfig::new(dir.path())).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, openims_api::router(svc))
            .await
            .unwrap();
    });
    (addr, dir)
}

/// Reads one HTTP/1.1 response (head and a Content-Length body) and returns its head.
async fn read_response(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                let n = conn.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed inside a response body");
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..end + 4 + len);
            return Some(head);
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no response within 10 s"),
        }
    }
}

#[tokio::test]
async fn an_unauthenticated_small_body_sent_late_keeps_the_connection_usable() {
    let (addr, _dir) = start().await;
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let body = br#"{"name":"x","disk_format":"raw","container_format":"bare"}"#;
    let head = format!(
        "POST /v2/images HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    // Headers and body in two writes with a gap, as Python's http.client sends them: the server
    // must not answer (and close) before the body has arrived.
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    conn.write_all(body).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let first = read_response(&mut conn, &mut buf)
        .await
        .expect("a response");
    assert!(first.starts_with("http/1.1 401"), "{first}");
    assert!(!first.contains("connection: close"), "{first}");
    let second = read_response(&mut conn, &mut buf)
        .await
        .expect("the connection still serves the next request");
    assert!(second.starts_with("http/1.1 200"), "{second}");
}

#[tokio::test]
async fn an_unauthenticated_large_body_left_unread_is_answered_with_connection_close() {
    let (addr, _dir) = start().await;
    let mut conn = TcpStream::connect(addr).await.unwrap();
    // An upload whose body never comes: the refusal must tell the client not to reuse the
    // connection.
    conn.write_all(
        b"PUT /v2/images/00000000-0000-0000-0000-000000000000/file HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\nContent-Length: 10485760\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let head = read_response(&mut conn, &mut buf)
        .await
        .expect("a response");
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
}
