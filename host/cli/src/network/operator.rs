//! A cluster that is its network's operator: the map server runs with a
//! gateway (it serves the map on the gateway's listener) and is the only
//! writer of its state (in the store); the REST workers list pending
//! registrations from that state and ask the map server, on the topic
//! `PREFIXmembership.admin`, to approve one, answering once the approval
//! is in the state.

use super::*;

/// A request to the map server, on [`braid_flow::cluster::FlowTopics::membership_admin`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) enum AdminRequest {
    /// Approve the pending registration of this X.500 name.
    Approve(String),
}

/// How long an approval through a cluster's REST worker waits for the map
/// server to record it.
const APPROVAL_WAIT: Duration = Duration::from_secs(15);

/// The map server's settings from `cfg`, its state in `store`: `None`
/// when this node does not run the map server.
pub(super) fn map_server_config(
    cfg: &NodeNetworkConfig,
    store: Arc<dyn braid_storage::Store>,
) -> anyhow::Result<Option<MapServerConfig>> {
    match (cfg.map_server, &cfg.operator_key, &cfg.map_state_path) {
        (true, Some(key), Some(state)) => Ok(Some(MapServerConfig {
            state: Arc::new(StoreMapState::new(store, state)),
            group: cfg.group.clone(),
            operator_key_pkcs8_der: pki::read_file(key)?,
            network_ca_der: pki::read_file(&cfg.network_ca)?,
            approval: cfg.approval,
            event_horizon: cfg.event_horizon(),
        })),
        (true, _, _) => anyhow::bail!(
            "the network configuration says map_server but names no operator_key or \
             map_state_path"
        ),
        _ => Ok(None),
    }
}

/// Carries out, on `server`, the requests the REST workers publish on
/// `topic` (read from its end: a request made while no map server ran is
/// answered as not recorded, and made again by its client).
pub(super) async fn follow_admin(
    server: Arc<MapServer>,
    bus: Arc<dyn braid_bus::topics::MessageBus>,
    topic: String,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let sub = bus
        .watch(&[topic.as_str()], braid_bus::topics::From::End)
        .await
        .context("reading the membership requests")?;
    Ok(tokio::spawn(cluster::read_records(
        sub,
        "membership.admin",
        async move |batch: Vec<AdminRequest>| {
            for r in batch {
                match r {
                    AdminRequest::Approve(name) => match name.parse::<X500Name>() {
                        Ok(n) => {
                            match server.approve(&n) {
                                Ok(()) => {}
                                // Every gateway's map server gets the
                                // request; one of the others did it.
                                Err(braid_membership::MembershipError::NotPending { .. }) => {
                                    tracing::debug!(member = %name, "approved already")
                                }
                                Err(e) => {
                                    tracing::warn!(member = %name, cause = %e, "approval not carried out")
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(member = %name, cause = %e, "approval of a bad name")
                        }
                    },
                }
            }
            true
        },
    )))
}

/// The network as the REST workers of an operator cluster show it: the map
/// from a read-only copy, pending registrations from the map server's
/// state in the store, approvals through the map server.
pub(super) struct ClusterOperator {
    pub map: Arc<MapClient>,
    pub group: String,
    pub server: MapServerConfig,
    pub bus: Arc<dyn braid_bus::topics::MessageBus>,
    pub topic: String,
}

impl ClusterOperator {
    /// The map server's state as last recorded (read, never written: the
    /// map server is its only writer).
    fn state(&self) -> Result<MapServer, WorkerError> {
        MapServer::open(self.server.clone())
            .map_err(|e| WorkerError::Busy(format!("reading the map server's state: {e}")))
    }
}

#[async_trait::async_trait]
impl Network for ClusterOperator {
    fn summary(&self) -> NetworkSummary {
        network_summary(&self.map, &self.group, true)
    }

    fn pending(&self) -> Result<Vec<MemberSummary>, WorkerError> {
        Ok(self.state()?.pending().iter().map(summary).collect())
    }

    async fn approve(&self, name: &X500Name) -> Result<(), WorkerError> {
        if !self.state()?.pending().iter().any(|m| &m.name == name) {
            return Err(WorkerError::NotFound(format!(
                "no pending registration of {name}"
            )));
        }
        let record = braid_bus::topics::Outgoing::new(
            b"approve".to_vec(),
            postcard::to_allocvec(&AdminRequest::Approve(name.to_string()))
                .expect("a request encodes"),
        );
        self.bus
            .publish(&self.topic, vec![record])
            .await
            .map_err(|e| WorkerError::Busy(format!("asking the map server: {e}")))?;
        let deadline = tokio::time::Instant::now() + APPROVAL_WAIT;
        loop {
            if self.state()?.members().iter().any(|m| &m.name == name) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(WorkerError::Busy(format!(
                    "the map server has not recorded the approval of {name} within \
                     {APPROVAL_WAIT:?} (is a gateway with the map server running?); retry"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn render_metrics(&self, out: &mut String) {
        map_gauges(&self.map.current(), out);
    }
}
