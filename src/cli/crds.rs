//! `whereabouts crds`: the CustomResourceDefinitions generated from the Rust types.

#[derive(clap::Args, Debug)]
pub struct CrdsArgs {}

pub fn run(_args: CrdsArgs) -> anyhow::Result<()> {
    anyhow::bail!("crds is not built yet")
}
