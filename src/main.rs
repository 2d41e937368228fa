//! Thin dispatch: a CNI call when CNI_COMMAND is set, otherwise the command line.

use std::io::{Read, Write};
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
    let vars = std::env::vars().collect();
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => whereabouts::plugin::run(&vars, &stdin),
        Err(err) => whereabouts::plugin::Outcome {
            stdout: Some(
                whereabouts::cni::error::CniError::new(
                    whereabouts::cni::error::code::IO_FAILURE,
                    format!("cannot read the network configuration from stdin: {err}"),
                )
                .to_json(whereabouts::cni::version::LATEST),
            ),
            exit_code: 1,
        },
    };
    if let Some(json) = outcome.stdout {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{json}");
        let _ = out.flush();
    }
    ExitCode::from(outcome.exit_code as u8)
}
