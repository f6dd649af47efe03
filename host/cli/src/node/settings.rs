//! `braid node start`'s settings: the node's own (data dir, store,
//! network), each worker's (flattened from its crate: [`braid_rest::RestArgs`],
//! [`braid_flow::FlowArgs`], [`braid_p2p::LinkArgs`],
//! [`braid_gateway::GatewayArgs`], [`braid_membership::MembershipArgs`])
//! and cluster mode's ([`ClusterArgs`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// Settings of an embedded node.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// Directory for the node's store, compiled-package cache and files
    /// (default with --network-config: the data_dir it names).
    #[arg(
        long,
        env = "BRAID_DATA_DIR",
        required_unless_present = "network_config"
    )]
    pub data_dir: Option<PathBuf>,
    /// Join an application network: the node.json that
    /// `braid network bootstrap` wrote for this node (gateway address and
    /// endpoint, TLS certificate and key, network CA and CRL, the map
    /// server's URL, and on the operator's node the map server's settings).
    /// Its group replaces --group.
    #[arg(long, env = "BRAID_NETWORK_CONFIG")]
    pub network_config: Option<PathBuf>,
    /// Where the node keeps its state: `embedded` (the default: a file
    /// database under DATA_DIR) or a PostgreSQL database
    /// (`postgres://USER:PASSWORD@HOST:PORT/DATABASE`; its schema is
    /// created and migrated at start; one node per database).
    #[arg(long, env = "BRAID_STORE", default_value = "embedded")]
    pub store: String,
    /// Name of the application network (part of every holding id).
    #[arg(long, env = "BRAID_GROUP", default_value = "default")]
    pub group: String,
    /// The REST worker's settings.
    #[command(flatten)]
    pub rest: Box<braid_rest::RestArgs>,
    /// The flow worker's settings.
    #[command(flatten)]
    pub flow: Box<braid_flow::FlowArgs>,
    /// The link manager's settings.
    #[command(flatten)]
    pub link: braid_p2p::LinkArgs,
    /// The gateway's settings.
    #[command(flatten)]
    pub gateway: Box<braid_gateway::GatewayArgs>,
    /// The membership client's settings.
    #[command(flatten)]
    pub membership: braid_membership::MembershipArgs,
    /// Cluster mode: the bus and this process's roles.
    #[command(flatten)]
    pub cluster: Box<ClusterArgs>,
}

/// Cluster mode: workers in separate processes that meet on a Kafka bus
/// and a PostgreSQL store (see docs/cluster.md).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ClusterArgs {
    /// The bus between workers: `embedded` (the default: every worker in
    /// this process) or Kafka, `kafka://HOST:PORT[,HOST:PORT...]` (needs a
    /// PostgreSQL --store, which every worker of the cluster shares).
    #[arg(long, env = "BRAID_BUS", default_value = "embedded")]
    pub bus: String,
    /// A librdkafka setting for every Kafka client, `KEY=VALUE`
    /// (`security.protocol=SASL_SSL`, `sasl.mechanism=SCRAM-SHA-512`,
    /// `ssl.ca.location=...`); repeat for several.
    #[arg(long = "bus-option", env = "BRAID_BUS_OPTIONS", value_delimiter = ';', value_parser = parse_option)]
    pub bus_options: Vec<(String, String)>,
    /// The workers this process runs, comma-separated, from `rest`,
    /// `flow`, `link`, `gateway`, `membership`; `all` (the default) is the
    /// embedded node. With --bus kafka:// each of `rest`, `flow`,
    /// `link,membership` and `gateway` can run in any number of processes
    /// (docs/cluster.md).
    #[arg(
        long,
        env = "BRAID_ROLES",
        default_value = "all",
        value_delimiter = ','
    )]
    pub roles: Vec<Role>,
    /// Partitions of the flow-event topic: the unit in which flow workers
    /// share flows (more than the flow workers you will ever run). Fixed
    /// once the topic exists.
    #[arg(long, env = "BRAID_FLOW_PARTITIONS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub flow_partitions: u16,
    /// Prefix of the topics braid creates and uses (several clusters can
    /// share brokers with different prefixes).
    #[arg(long, env = "BRAID_TOPIC_PREFIX", default_value = "braid.")]
    pub topic_prefix: String,
    /// Replication factor of topics braid creates (production: 3, with the
    /// brokers' min.insync.replicas=2).
    #[arg(long, env = "BRAID_BUS_REPLICATION", default_value_t = 1, value_parser = clap::value_parser!(i16).range(1..))]
    pub bus_replication: i16,
    /// How long a flow worker may go silent before the group hands its
    /// partitions to the others, ms (Kafka's session.timeout.ms).
    #[arg(long, env = "BRAID_BUS_SESSION_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1000..))]
    pub bus_session_timeout_ms: u64,
}

/// A worker role of `--roles`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Every role (the embedded node).
    All,
    /// The REST API.
    Rest,
    /// The flow worker.
    Flow,
    /// The link manager.
    Link,
    /// The gateway.
    Gateway,
    /// The network-map client (and server, on the operator's node).
    Membership,
}

fn parse_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

impl Default for ClusterArgs {
    /// The flags' defaults.
    fn default() -> Self {
        braid_types::settings::defaults()
    }
}

impl ClusterArgs {
    /// Whether this process runs `role`.
    pub fn runs(&self, role: Role) -> bool {
        self.roles.iter().any(|r| *r == Role::All || *r == role)
    }
}

impl NodeArgs {
    /// Defaults for a node under `data_dir` on a free loopback port.
    pub fn local(data_dir: PathBuf) -> NodeArgs {
        let mut args: NodeArgs = braid_types::settings::parse([
            std::ffi::OsString::from("--data-dir"),
            data_dir.into_os_string(),
        ])
        .expect("a data dir is all a node needs");
        args.rest.rest_addr = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;
    use std::time::Duration;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        node: NodeArgs,
    }

    #[test]
    fn settings_in_code_are_the_flags_defaults_and_zero_timeouts_are_refused() {
        // `NodeArgs::local` and every worker's `Default` read the flags'
        // defaults: the same values as parsing no flags.
        let parsed =
            Cli::try_parse_from(["braid", "--data-dir", "/d", "--rest-addr", "127.0.0.1:0"])
                .expect("flags");
        assert_eq!(
            format!("{:?}", parsed.node),
            format!("{:?}", NodeArgs::local("/d".into()))
        );
        assert_eq!(*parsed.node.flow, braid_flow::FlowArgs::default());
        assert_eq!(*parsed.node.gateway, braid_gateway::GatewayArgs::default());
        assert_eq!(parsed.node.link, braid_p2p::LinkArgs::default());
        assert_eq!(*parsed.node.cluster, ClusterArgs::default());
        assert_eq!(braid_flow::FlowArgs::default().max_live_flows, 2000);
        let e = Cli::try_parse_from(["braid", "--data-dir", "/d", "--rest-idle-timeout-secs", "0"])
            .err()
            .expect("a zero timeout is refused");
        assert!(e.to_string().contains("rest-idle-timeout-secs"), "{e}");
        let set =
            Cli::try_parse_from(["braid", "--data-dir", "/d", "--gateway-body-timeout-secs=7"])
                .unwrap();
        assert_eq!(
            set.node.gateway.limits(1024).body_timeout,
            Duration::from_secs(7)
        );
    }

    #[test]
    fn the_default_connection_limit_follows_the_file_limit_within_bounds() {
        assert_eq!(braid_http::default_max_connections(1024), 192);
        assert_eq!(braid_http::default_max_connections(100), 64);
        assert_eq!(braid_http::default_max_connections(1 << 20), 4096);
        let args = braid_rest::RestArgs {
            rest_max_connections: Some(10),
            ..Default::default()
        };
        assert_eq!(args.limits(1 << 20).max_connections, 10);
        assert_eq!(
            braid_gateway::GatewayArgs::default()
                .limits(1 << 20)
                .max_connections,
            4096
        );
    }
}
