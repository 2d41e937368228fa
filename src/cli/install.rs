//! `whereabouts install`: puts the plugin on a node.

#[derive(clap::Args, Debug)]
pub struct InstallArgs {}

pub fn run(_args: InstallArgs) -> anyhow::Result<()> {
    anyhow::bail!("install is not built yet")
}
