//! A TCP relay that can go silent: connections made through it before [`Blackhole::cut`] stay open but
//! carry nothing more either way, as a half-open connection does (a peer gone behind a NAT or a failover,
//! no RST); connections made after it relay normally.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

pub struct Blackhole {
    pub addr: SocketAddr,
    cut: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    /// Relays every connection to `target`.
    pub async fn start(target: SocketAddr) -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(Notify::new());
        // Silenced connections are kept open here until the relay stops.
        let silenced: Arc<Mutex<Vec<(TcpStream, TcpStream)>>> = Arc::default();
        let task = tokio::spawn({
            let cut = cut.clone();
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let Ok(mut server) = TcpStream::connect(target).await else { continue };
                    let (cut, silenced) = (cut.clone(), silenced.clone());
                    // Registered now, so that only a cut from here on silences this connection.
                    let notified = Box::pin(cut.notified_owned());
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = notified => silenced.lock().unwrap().push((client, server)),
                        }
                    });
                }
            }
        });
        Blackhole { addr, cut, task }
    }

    /// Silences every connection open now.
    pub fn cut(&self) {
        self.cut.notify_waiters();
    }

    /// `url` with its host and port replaced by this relay's.
    pub fn url_through(&self, url: &str) -> String {
        let mut url = url::Url::parse(url).unwrap();
        url.set_host(Some(&self.addr.ip().to_string())).unwrap();
        url.set_port(Some(self.addr.port())).unwrap();
        url.to_string()
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}
