//! The plugin-only build: a CNI call, nothing else. The installer puts it on hosts whose node
//! agent serves the cluster engines, in place of the full binary and under the same name. It
//! leaves the Kubernetes and etcd clients out ([`whereabouts::store::open_local`]), so every
//! call starts sooner; the local engine, and asking the agent, are the same code as in the full
//! binary.

use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_none() {
        eprintln!(
            "{}\nThis is the plugin-only build: the commands (agent, controller, install and the \
             operator's) are in the full binary.",
            whereabouts::plugin::about()
        );
        return ExitCode::from(if std::env::args_os().len() <= 1 { 0 } else { 2 });
    }
    whereabouts::plugin::run_process(
        std::env::vars_os(),
        std::io::stdin().lock(),
        whereabouts::store::open_local,
    )
    .finish()
}
