//! The command line: what the binary does when it is not called as a CNI plugin.

pub mod agent;
pub mod allocations;
pub mod controller;
pub mod crds;
pub mod doctor;
pub mod gc;
pub mod install;
pub mod output;
pub mod pools;
pub mod release;
pub mod store_args;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "whereabouts", version, about = "Cluster-wide IPAM for CNI")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Install the plugin on this node: binary, flat file, kubeconfig, node name.
    Install(install::InstallArgs),
    /// Print the CustomResourceDefinitions generated from the Rust types.
    Crds(crds::CrdsArgs),
    /// List the pools: range, used, free, utilisation.
    Pools(pools::PoolsArgs),
    /// List the allocations (of one range or pool): address, pod, container, interface.
    Allocations(allocations::AllocationsArgs),
    /// Run the node agent that serves the plugin on a unix socket (one per node).
    Agent(agent::AgentArgs),
    /// Run the cluster's cleanup and node-slice controller (one per cluster).
    Controller(controller::ControllerArgs),
    /// Free one address; refuses while its pod is alive unless --force.
    Release(release::ReleaseArgs),
    /// Free every allocation no live pod holds (--dry-run: list them and why).
    Gc(gc::GcArgs),
    /// Check the Kubernetes objects for lost or doubled addresses and for what a Go
    /// Whereabouts binary would drop or misread (--fix: repair what is safe).
    Doctor(doctor::DoctorArgs),
}

/// Runs a subcommand.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    // The agent and the controller log as their flat file says, the installer its progress;
    // the operator commands print their report, and what went wrong on the way on stderr.
    match &cli.command {
        Command::Agent(_) | Command::Controller(_) | Command::Install(_) => {}
        _ => crate::logging::init_command(tracing::Level::WARN),
    }
    match cli.command {
        Command::Install(args) => install::run(args),
        Command::Crds(args) => crds::run(args),
        Command::Pools(args) => pools::run(args),
        Command::Allocations(args) => allocations::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Controller(args) => controller::run(args),
        Command::Release(args) => release::run(args),
        Command::Gc(args) => gc::run(args),
        Command::Doctor(args) => doctor::run(args),
    }
}
