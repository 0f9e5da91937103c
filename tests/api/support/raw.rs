//! Misbehaving receivers on raw TCP: ones no HTTP framework would let us write.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Copy)]
pub enum Misbehaviour {
    /// Read the request, then close the connection without a word.
    Reset,
    /// Answer 200 with a body that never ends.
    EndlessBody,
    /// Read the request and never answer (until the test ends, at most a minute).
    Hang,
}

/// A receiver that misbehaves on every connection; counts the connections it took.
pub struct RawReceiver {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
}

impl RawReceiver {
    pub async fn start(ip: &str, how: Misbehaviour) -> RawReceiver {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let _ = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await;
                    match how {
                        Misbehaviour::Reset => drop(socket),
                        Misbehaviour::EndlessBody => {
                            let head =
                                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";
                            if socket.write_all(head.as_bytes()).await.is_err() {
                                return;
                            }
                            let chunk = format!("1000\r\n{}\r\n", "x".repeat(0x1000));
                            // Bounded: stops when the client hangs up, or after 256 MiB.
                            for _ in 0..65_536 {
                                if socket.write_all(chunk.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Misbehaviour::Hang => {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                        }
                    }
                });
            }
        });
        RawReceiver { addr, connections }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}
