//! Not built yet.

#[derive(clap::Args)]
pub struct Args {}

#[derive(clap::Args)]
pub struct WorkerArgs {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}

pub fn run_worker(_args: WorkerArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
