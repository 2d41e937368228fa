//! Thin dispatch: a CNI call when CNI_COMMAND is set, otherwise the command line.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        return plugin();
    }
    if std::env::args_os().len() <= 1 {
        eprintln!("{}", whereabouts::plugin::about());
        return ExitCode::SUCCESS;
    }
    let cli = whereabouts::cli::Cli::parse();
    match whereabouts::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("whereabouts: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn plugin() -> ExitCode {
    whereabouts::plugin::run_process(
        std::env::vars_os(),
        std::io::stdin().lock(),
        whereabouts::store::open,
    )
    .finish()
}
