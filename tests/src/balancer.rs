//! A TCP load balancer for tests: what several gateways of a cluster sit
//! behind. It passes each connection through, TLS and all, to the next
//! backend in turn that accepts it (a dead one is skipped), so the peers'
//! mutual TLS is with the gateways themselves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A running balancer; dropping it stops it (and the connections it
/// carries).
pub struct Balancer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Balancer {
    /// Listens on `listen` and spreads connections over `backends`.
    pub fn start(listen: SocketAddr, backends: Vec<SocketAddr>) -> Balancer {
        let std_listener = std::net::TcpListener::bind(listen)
            .unwrap_or_else(|e| panic!("the balancer cannot listen on {listen}: {e}"));
        std_listener.set_nonblocking(true).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the balancer");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                let next = Arc::new(AtomicUsize::new(0));
                let backends = Arc::new(backends);
                let accept = async {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            continue;
                        };
                        let (next, backends) = (next.clone(), backends.clone());
                        tokio::spawn(async move {
                            let first = next.fetch_add(1, Ordering::Relaxed);
                            for i in 0..backends.len() {
                                let to = backends[(first + i) % backends.len()];
                                if let Ok(mut server) = tokio::net::TcpStream::connect(to).await {
                                    let mut client = client;
                                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server)
                                        .await;
                                    return;
                                }
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
        });
        Balancer {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
