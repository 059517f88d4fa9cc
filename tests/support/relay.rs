//! A TCP relay on 127.0.0.1 in front of a server: [`Relay`]. It stands for what lies
//! between a client and its server in production: the address a failover moves (a
//! virtual IP, a pooler's target) and a network that can stop carrying bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A relay from its own port to an upstream port on 127.0.0.1, stopped when dropped.
pub struct Relay {
    port: u16,
    upstream: Arc<AtomicU16>,
    /// While `true`, no relayed byte moves, in either direction.
    stalled: watch::Sender<bool>,
    /// Bumped by [`Relay::cut`]: every connection relayed before closes.
    cuts: watch::Sender<u64>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Starts relaying connections to `upstream`.
    pub async fn start(upstream: u16) -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let upstream = Arc::new(AtomicU16::new(upstream));
        let (stalled, _) = watch::channel(false);
        let (cuts, _) = watch::channel(0);
        let accept = {
            let (upstream, stalled, mut cut) =
                (Arc::clone(&upstream), stalled.subscribe(), cuts.subscribe());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let target = upstream.load(Ordering::SeqCst);
                    // Cuts made before this connection are not for it.
                    cut.borrow_and_update();
                    let (stalled, mut cut) = (stalled.clone(), cut.clone());
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                            return; // the client sees its connection close
                        };
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        tokio::select! {
                            () = pipe(client_read, server_write, stalled.clone()) => {}
                            () = pipe(server_read, client_write, stalled) => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            })
        };
        Ok(Relay {
            port,
            upstream,
            stalled,
            cuts,
            accept,
        })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends new connections to `upstream` from now on (open ones stay where they are).
    pub fn point_at(&self, upstream: u16) {
        self.upstream.store(upstream, Ordering::SeqCst);
    }

    /// Stops every byte on every connection, open or new, until [`resume`](Self::resume):
    /// the connections stay open, silent.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Lets bytes move again after [`stall`](Self::stall).
    pub fn resume(&self) {
        self.stalled.send_replace(false);
    }

    /// Closes every connection relayed so far, dropping the bytes they hold.
    pub fn cut(&self) {
        self.cuts.send_modify(|cuts| *cuts += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Copies `from` to `to` until either closes, holding each read while the relay stalls.
async fn pipe(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut stalled: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if stalled.wait_for(|stalled| !stalled).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.wait_for(|stalled| !stalled).await.is_err()
            || to.write_all(&buf[..n]).await.is_err()
        {
            return;
        }
    }
}
