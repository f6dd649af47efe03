//! `braid bench`: ping flows between two vnodes of one embedded node.

/// Benchmark settings.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Flows to run for the throughput figure.
    #[arg(long, default_value_t = 5000)]
    pub flows: usize,
}

/// Runs the benchmark.
pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
