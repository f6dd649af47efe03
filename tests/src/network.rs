//! Networks of nodes made by `braid network bootstrap`, and a TCP proxy
//! that sits between two gateways (dropping, delaying and recording).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngExt as _;
use serde_json::Value;

use crate::{Api, DEADLINE, Node, braid_bin, fresh_dir, wait_until};

/// Ports a network of `nodes` nodes uses from its base port.
fn ports_needed(nodes: usize) -> u16 {
    10 * nodes as u16 + 2
}

/// A base port whose range (10 per node) is free now. Tests in one process
/// get disjoint ranges; other processes are avoided by probing.
fn free_base_port(nodes: usize) -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 200) as u16 * 100,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..200 {
        let base = NEXT.fetch_add(100, Ordering::SeqCst);
        let base = if base > 60_000 {
            NEXT.store(20_000, Ordering::SeqCst);
            continue;
        } else {
            base
        };
        let all_free =
            (0..ports_needed(nodes)).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no free range of loopback ports found");
}

/// A development network from `braid network bootstrap`, in a fresh
/// directory (removed on drop unless the test failed).
pub struct Network {
    /// The network's directory.
    pub dir: PathBuf,
}

impl Network {
    /// Bootstraps a network of `nodes` (short names) with `extra`
    /// arguments to `braid network bootstrap`.
    pub fn bootstrap(nodes: &[&str], extra: &[&str]) -> Network {
        let dir = fresh_dir("net").join("network");
        let base = free_base_port(nodes.len());
        let out = Command::new(braid_bin())
            .args(["network", "bootstrap", "--dir"])
            .arg(&dir)
            .arg("--nodes")
            .arg(nodes.join(","))
            .arg("--base-port")
            .arg(base.to_string())
            .args(extra)
            .output()
            .expect("run braid network bootstrap");
        assert!(
            out.status.success(),
            "braid network bootstrap failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Network { dir }
    }

    /// Runs `braid network <args>` on this network's directory.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(braid_bin())
            .arg("network")
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .output()
            .expect("run braid network")
    }

    /// `DIR/<node>/node.json`.
    pub fn config_path(&self, node: &str) -> PathBuf {
        self.dir.join(node).join("node.json")
    }

    /// The node's configuration as JSON.
    pub fn config(&self, node: &str) -> Value {
        let path = self.config_path(node);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Rewrites the node's configuration.
    pub fn edit_config(&self, node: &str, edit: impl FnOnce(&mut Value)) {
        let mut v = self.config(node);
        edit(&mut v);
        std::fs::write(
            self.config_path(node),
            serde_json::to_vec_pretty(&v).expect("json"),
        )
        .expect("write node.json");
    }

    /// The address the node's gateway listens on.
    pub fn gateway_addr(&self, node: &str) -> SocketAddr {
        let v = self.config(node);
        v["gateway_addr"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("node.json of {node} has no gateway_addr: {v}"))
    }

    /// Starts the node on its configuration (REST on a free port).
    pub fn start(&self, node: &str) -> Node {
        self.start_with(node, Node::options())
    }

    /// [`start`](Self::start) with more options.
    pub fn start_with(&self, node: &str, options: crate::NodeOptions) -> Node {
        options
            .data_dir(self.dir.join(node).join("data"))
            .arg("--network-config")
            .arg(self.config_path(node).to_string_lossy().into_owned())
            .start()
    }

    /// Waits until `api`'s node holds a network map listing every name in
    /// `members`.
    pub fn wait_members(api: &Api, members: &[&str]) {
        wait_until("the network map to list every member", DEADLINE, || {
            let resp = api.get("/api/v1/network").map_err(|e| e.to_string())?;
            let listed: Vec<String> = resp.json["members"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|m| m["name"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            if members.iter().all(|m| listed.iter().any(|l| l == m)) {
                Ok(())
            } else {
                Err(format!("the map lists {listed:?}"))
            }
        });
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("[e2e] network directory kept at {}", self.dir.display());
        } else if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

/// What a [`TcpProxy`] does to connections.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProxyPolicy {
    /// Of every 1000 connections, how many are cut (at once, or after a
    /// random part of the exchange).
    pub drop_permille: u32,
    /// Connections that are not cut are held up to this long before the
    /// upstream connection is made.
    pub max_delay_ms: u64,
}

/// A TCP proxy on a loopback port that forwards to `upstream`, records
/// every byte both ways, and cuts or delays connections by its policy.
pub struct TcpProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    policy: Arc<Mutex<ProxyPolicy>>,
    captured: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    /// Connections accepted.
    pub accepted: Arc<AtomicU64>,
    /// Connections cut on purpose.
    pub cut: Arc<AtomicU64>,
}

impl TcpProxy {
    /// Listens on `listen` (port 0: any) and forwards to `upstream`.
    pub fn start(listen: SocketAddr, upstream: SocketAddr, policy: ProxyPolicy) -> TcpProxy {
        let listener = TcpListener::bind(listen).expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let proxy = TcpProxy {
            addr,
            policy: Arc::new(Mutex::new(policy)),
            captured: Arc::default(),
            stop: Arc::default(),
            accepted: Arc::default(),
            cut: Arc::default(),
        };
        let (policy, captured, stop, accepted, cut) = (
            proxy.policy.clone(),
            proxy.captured.clone(),
            proxy.stop.clone(),
            proxy.accepted.clone(),
            proxy.cut.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                accepted.fetch_add(1, Ordering::SeqCst);
                let p = *policy.lock().unwrap();
                let (captured, cut) = (captured.clone(), cut.clone());
                std::thread::spawn(move || serve(client, upstream, p, captured, cut));
            }
        });
        proxy
    }

    /// Changes the policy for new connections.
    pub fn set_policy(&self, policy: ProxyPolicy) {
        *self.policy.lock().unwrap() = policy;
    }

    /// Every byte forwarded so far, both directions.
    pub fn captured(&self) -> Vec<u8> {
        self.captured.lock().unwrap().clone()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    p: ProxyPolicy,
    captured: Arc<Mutex<Vec<u8>>>,
    cut: Arc<AtomicU64>,
) {
    let mut rng = rand::rng();
    let cut_after = if rng.random_range(0..1000) < p.drop_permille {
        cut.fetch_add(1, Ordering::SeqCst);
        if rng.random_bool(0.5) {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        // Cut mid-stream: after a random number of bytes either way.
        Some(rng.random_range(1..4096u64))
    } else {
        None
    };
    if p.max_delay_ms > 0 {
        std::thread::sleep(Duration::from_millis(rng.random_range(0..=p.max_delay_ms)));
    }
    let Ok(server) = TcpStream::connect(upstream) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let budget = Arc::new(AtomicU64::new(cut_after.unwrap_or(u64::MAX)));
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        let (captured, budget) = (captured.clone(), budget.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 16384];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let left = budget.fetch_sub(n as u64, Ordering::SeqCst);
                if left <= n as u64 {
                    break;
                }
                captured.lock().unwrap().extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        })
    };
    let a = pipe(
        client.try_clone().expect("clone"),
        server.try_clone().expect("clone"),
    );
    let b = pipe(server, client);
    let _ = a.join();
    let _ = b.join();
}
