//! The membership client as a worker: its settings ([`MembershipArgs`],
//! flags of `braid node start`) and [`run`], which keeps the node's own
//! member records published and the network map polled.

use crate::{MapClient, NodeNetworkConfig, SignedMemberInfo};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::watch;

/// How the membership client polls the map and republishes the node's
/// records: each overrides the network configuration's setting.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct MembershipArgs {
    /// Milliseconds between polls of the network map. Default: the
    /// network configuration's `poll_interval_ms`.
    #[arg(long, env = "BRAID_MAP_POLL_MS", value_parser = clap::value_parser!(u64).range(10..))]
    pub map_poll_ms: Option<u64>,
    /// Seconds between republications of this node's member records (the
    /// map server counts a member as seen when it republishes). Default:
    /// the network configuration's `republish_secs`, else a day.
    #[arg(long, env = "BRAID_MAP_REPUBLISH_SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub map_republish_secs: Option<u64>,
}

impl Default for MembershipArgs {
    /// The flags' defaults.
    fn default() -> Self {
        braid_types::settings::defaults()
    }
}

impl MembershipArgs {
    /// Applies these settings to `node` (every map client made from it
    /// follows them).
    pub fn apply(&self, node: &mut NodeNetworkConfig) {
        if let Some(ms) = self.map_poll_ms {
            node.poll_interval_ms = ms;
        }
        if let Some(s) = self.map_republish_secs {
            node.republish_secs = Some(s);
        }
    }
}

/// Where the node's own member records come from (the binary signs them
/// from the vnodes and their session keys).
#[async_trait::async_trait]
pub trait OwnRecords: Send + Sync + 'static {
    /// The records to publish now.
    async fn records(&self) -> Result<Vec<SignedMemberInfo>, String>;
    /// Changes whenever the records may have changed (a vnode was added).
    fn changed(&self) -> watch::Receiver<u64>;
}

/// What the membership client works with.
pub struct MembershipDeps {
    /// The map client, made from a configuration [`MembershipArgs::apply`]
    /// set (other workers of the process follow its view).
    pub map: Arc<MapClient>,
    /// The node's records.
    pub own: Arc<dyn OwnRecords>,
}

/// Publishes the node's records (now, whenever they change, and every
/// `--map-republish-secs`) and polls the map, until `shutdown`. Fails at
/// once if the first records cannot be made. (The settings are the map
/// client's: [`MembershipArgs::apply`].)
pub async fn run(
    deps: MembershipDeps,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    let MembershipDeps { map, own } = deps;
    map.set_own(own.records().await?);
    let follow = {
        let (map, own) = (map.clone(), own.clone());
        let mut changed = own.changed();
        async move {
            while changed.changed().await.is_ok() {
                match own.records().await {
                    Ok(r) => map.set_own(r),
                    Err(e) => {
                        tracing::error!(cause = %e, "cannot publish the vnodes' member records")
                    }
                }
            }
            std::future::pending::<()>().await
        }
    };
    tokio::select! {
        () = map.run(shutdown) => {}
        () = follow => {}
    }
    Ok(())
}
