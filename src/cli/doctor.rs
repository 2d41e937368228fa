//! `whereabouts doctor [--fix]`: checks the Kubernetes engine's objects for what would cost an
//! address (a reservation missing or left behind, an address held twice, a node slice out of
//! step) or what a Go Whereabouts binary would drop or misread, before, during and after a
//! migration; on etcd, whether the runs, marks, records, owner entries and reservations agree
//! (`store::etcd::doctor`). Read-only unless `--fix`, which repairs only what is safe without
//! a human.

use std::io::IsTerminal;

use serde::Serialize;

use super::output::{emit, Output, OutputArgs};
use super::store_args::StoreArgs;
use crate::config::Datastore;
use crate::store::{etcd, kubernetes};

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Kubernetes: create missing reservations and delete reservations no pool holds (each
    /// write conditional on what was read). etcd: fold the freed marks, as the controller's
    /// reconcile does. Everything else is only reported.
    #[arg(long)]
    pub fix: bool,
    /// A reservation no pool holds is deleted only once it is this old (seconds): an ADD in
    /// progress creates its reservation before its pool entry.
    #[arg(long, default_value_t = kubernetes::doctor::ORPHAN_AGE.as_secs())]
    pub orphan_age: u64,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub format: OutputArgs,
}

#[derive(Serialize)]
struct Report<'a, F> {
    healthy: bool,
    findings: &'a [F],
}

/// A finding of either engine's doctor, as the report prints it.
trait Row: Serialize {
    /// PROBLEM, OBJECT, ADDRESS, ACTION, DETAIL.
    fn cells(&self) -> Vec<String>;
    fn fixed(&self) -> bool;
}

/// The problem's name as the JSON report spells it.
fn problem_name(problem: impl Serialize) -> String {
    serde_json::to_value(problem)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// [`Row`] for a finding type with the fields both engines' findings share.
macro_rules! finding_row {
    ($finding:ty) => {
        impl Row for $finding {
            fn cells(&self) -> Vec<String> {
                let address = self.address.clone().unwrap_or_default();
                let (object, action) = (self.object.clone(), self.action.clone());
                let problem = problem_name(self.problem);
                vec![problem, object, address, action, self.detail.clone()]
            }

            fn fixed(&self) -> bool {
                self.action == "fixed"
            }
        }
    };
}

finding_row!(kubernetes::doctor::Finding);
finding_row!(etcd::doctor::Finding);

/// Prints the findings; fails (exit status 1) while any remains unfixed.
pub fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let cfg = args.store.ipam()?;
    // The error keeps its causes (a refusal's "forbidden: cannot list ippools", a TLS failure).
    let failed = anyhow::Error::new::<crate::store::StoreError>;
    match &cfg.datastore {
        Datastore::Kubernetes(k8s) => {
            let orphan_age = std::time::Duration::from_secs(args.orphan_age);
            let checked = kubernetes::doctor(&cfg, k8s, args.fix, orphan_age).map_err(failed)?;
            // An empty report of the wrong namespace reads as healthy: say which was read.
            eprintln!(
                "checked the IPPools and reservations of {} (--namespace to change)",
                checked.scope
            );
            if let Some(unread) = &checked.unread {
                eprintln!("{unread}");
            }
            report(args.format.output, &checked.findings)
        }
        Datastore::Etcd(store) => {
            let mut progress = EtcdProgress::default();
            let findings = etcd::doctor(&cfg, store, args.fix, &mut |p| progress.heard(p));
            progress.done();
            report(args.format.output, &findings.map_err(failed)?)
        }
        Datastore::Local { .. } => anyhow::bail!(
            "whereabouts doctor checks the kubernetes and etcd datastores; the local one changes \
             its SQLite file in transactions (sqlite3 <local_path> 'PRAGMA integrity_check' \
             checks the file)"
        ),
    }
}

/// Tells the person at the terminal how the etcd doctor's reading goes: keys read so far (a
/// store of millions takes a while), on one line of standard error that is redrawn; and, on
/// any standard error, when it has to read everything again.
#[derive(Default)]
struct EtcdProgress {
    /// Whether a count is on the line.
    drawn: bool,
}

impl EtcdProgress {
    fn heard(&mut self, progress: etcd::doctor::Progress) {
        match progress {
            etcd::doctor::Progress::Read(keys) if std::io::stderr().is_terminal() => {
                eprint!("\rread {keys} keys");
                self.drawn = true;
            }
            etcd::doctor::Progress::Read(_) => {}
            etcd::doctor::Progress::StartedOver => {
                self.done();
                eprintln!(
                    "etcd compacted the revision the doctor was reading at; reading again at the \
                     current one"
                );
            }
        }
    }

    /// Ends the line of the count, if one was drawn.
    fn done(&mut self) {
        if std::mem::take(&mut self.drawn) {
            eprintln!();
        }
    }
}

fn report<F: Row>(output: Output, findings: &[F]) -> anyhow::Result<()> {
    let healthy = findings.iter().all(Row::fixed);
    match output {
        Output::Json => emit(&format!(
            "{}\n",
            serde_json::to_string_pretty(&Report { healthy, findings })?
        ))?,
        Output::Table => {
            let rows: Vec<Vec<String>> = findings.iter().map(Row::cells).collect();
            emit(&super::output::table(
                &["PROBLEM", "OBJECT", "ADDRESS", "ACTION", "DETAIL"],
                &rows,
            ))?;
        }
    }
    if !healthy {
        anyhow::bail!(
            "{} finding(s) need attention",
            findings.iter().filter(|f| !f.fixed()).count()
        );
    }
    Ok(())
}
