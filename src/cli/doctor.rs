//! `whereabouts doctor [--fix]`: checks the Kubernetes engine's objects for what would cost an
//! address (a reservation missing or left behind, an address held twice, a node slice out of
//! step) or what a Go Whereabouts binary would drop or misread, before, during and after a
//! migration. Read-only unless `--fix`, which repairs only what is safe without a human.

use serde::Serialize;

use super::output::{emit, Output};
use super::store_args::StoreArgs;
use crate::config::Datastore;
use crate::store::kubernetes;

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Create missing reservations and delete reservations no pool holds (each write
    /// conditional on what was read); everything else is only reported.
    #[arg(long)]
    pub fix: bool,
    /// A reservation no pool holds is deleted only once it is this old (seconds): an ADD in
    /// progress creates its reservation before its pool entry.
    #[arg(long, default_value_t = kubernetes::doctor::ORPHAN_AGE.as_secs())]
    pub orphan_age: u64,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Serialize)]
struct Report<'a> {
    healthy: bool,
    findings: &'a [kubernetes::doctor::Finding],
}

/// Prints the findings; fails (exit status 1) while any remains unfixed.
pub fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let cfg = args.store.ipam()?;
    let Datastore::Kubernetes(k8s) = &cfg.datastore else {
        anyhow::bail!("whereabouts doctor checks the kubernetes datastore only (give --kubeconfig or --datastore kubernetes)");
    };
    let orphan_age = std::time::Duration::from_secs(args.orphan_age);
    let findings =
        kubernetes::doctor(&cfg, k8s, args.fix, orphan_age).map_err(|e| anyhow::anyhow!("{e}"))?;
    let healthy = findings.iter().all(|f| f.action == "fixed");
    match args.store.output {
        Output::Json => emit(&format!(
            "{}\n",
            serde_json::to_string_pretty(&Report {
                healthy,
                findings: &findings
            })?
        ))?,
        Output::Table => {
            let rows: Vec<Vec<String>> = findings
                .iter()
                .map(|f| {
                    vec![
                        serde_json::to_value(f.problem)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default(),
                        f.object.clone(),
                        f.address.clone().unwrap_or_default(),
                        f.action.clone(),
                        f.detail.clone(),
                    ]
                })
                .collect();
            emit(&super::output::table(
                &["PROBLEM", "OBJECT", "ADDRESS", "ACTION", "DETAIL"],
                &rows,
            ))?;
        }
    }
    if !healthy {
        anyhow::bail!(
            "{} finding(s) need attention",
            findings.iter().filter(|f| f.action != "fixed").count()
        );
    }
    Ok(())
}
