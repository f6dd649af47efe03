//! Cluster mode's wiring: which roles may run together, the bus, the
//! topics and this process's place in the flow workers' group.

use super::{NodeArgs, Role};
use anyhow::Context as _;
use std::sync::Arc;
use std::time::Duration;

/// The cluster settings of `--bus` and `--roles`: `None` for the
/// embedded node (every role in this process, on the in-process bus).
pub(super) async fn cluster_config(
    args: &NodeArgs,
    networked: bool,
) -> anyhow::Result<Option<braid_flow::cluster::ClusterConfig>> {
    use braid_flow::cluster::{ClusterConfig, ClusterRole, FlowTopics};
    let c = &args.cluster;
    if c.bus == "embedded" {
        if !c.runs(Role::Rest)
            || !c.runs(Role::Flow)
            || (networked && !(c.runs(Role::Link) && c.runs(Role::Gateway)))
        {
            anyhow::bail!(
                "--roles other than `all` need a bus between the workers: --bus kafka://HOST:PORT"
            );
        }
        return Ok(None);
    }
    let mut kafka = braid_bus_kafka::KafkaConfig::parse(&c.bus).context("--bus")?;
    if args.store == "embedded" {
        anyhow::bail!(
            "--bus {} needs a store every worker shares: --store postgres://...",
            c.bus
        );
    }
    if c.roles.contains(&Role::All) {
        anyhow::bail!(
            "--roles all is the embedded node; with --bus {} name the workers this process \
             runs: rest, flow, and (in a network) link,gateway,membership",
            c.bus
        );
    }
    if c.runs(Role::Link) != c.runs(Role::Membership) {
        anyhow::bail!(
            "the link manager and the membership client (which publishes the vnodes' session \
             keys) run in one process: --roles link,membership (see docs/cluster.md)"
        );
    }
    if (c.runs(Role::Link) || c.runs(Role::Gateway)) && !networked {
        anyhow::bail!(
            "--roles link,membership and --roles gateway connect this cluster to a network: \
             they need --network-config"
        );
    }
    kafka.options = c.bus_options.clone();
    kafka.replication = c.bus_replication;
    kafka.session_timeout = Duration::from_millis(c.bus_session_timeout_ms);
    let topics = FlowTopics::with_prefix(&c.topic_prefix, c.flow_partitions);
    let bus = braid_bus_kafka::KafkaBus::connect(kafka, topics.specs())
        .await
        .context("connecting to the bus (--bus)")?;
    let role = if c.runs(Role::Flow) {
        ClusterRole::Flows
    } else {
        ClusterRole::Client
    };
    Ok(Some(ClusterConfig {
        bus: Arc::new(bus),
        topics,
        role,
        liveness: Duration::from_millis(2 * c.bus_session_timeout_ms),
        owner: format!(
            "braid {:?} worker, pid {}, {}",
            c.roles,
            std::process::id(),
            args.data_dir
                .as_ref()
                .map_or_else(String::new, |d| d.display().to_string())
        ),
        remote: None,
        sweep: braid_flow::cluster::SWEEP,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn worker_roles_that_cannot_run_together_are_refused_with_the_reason() {
        let dir = std::env::temp_dir();
        let refused = async |bus: &str, store: &str, roles: &[Role], networked: bool| {
            let mut args = NodeArgs::local(dir.clone());
            args.cluster.bus = bus.into();
            args.store = store.into();
            args.cluster.roles = roles.to_vec();
            match cluster_config(&args, networked).await {
                Ok(_) => panic!("{roles:?} on {bus} was accepted"),
                Err(e) => format!("{e:#}"),
            }
        };
        let kafka = "kafka://127.0.0.1:1";
        let pg = "postgres://braid@127.0.0.1:1/braid";
        let e = refused("embedded", "embedded", &[Role::Rest], false).await;
        assert!(e.contains("need a bus"), "{e}");
        let e = refused(kafka, "embedded", &[Role::Flow], false).await;
        assert!(e.contains("--store postgres://"), "{e}");
        let e = refused(kafka, pg, &[Role::All], false).await;
        assert!(e.contains("--roles all is the embedded node"), "{e}");
        for roles in [
            &[Role::Link][..],
            &[Role::Membership],
            &[Role::Link, Role::Gateway],
        ] {
            let e = refused(kafka, pg, roles, true).await;
            assert!(e.contains("--roles link,membership"), "{roles:?}: {e}");
        }
        for roles in [&[Role::Gateway][..], &[Role::Link, Role::Membership]] {
            let e = refused(kafka, pg, roles, false).await;
            assert!(e.contains("need --network-config"), "{roles:?}: {e}");
        }
    }
}
