//! What the operator's commands print: aligned tables or JSON, on stdout.

use std::io::Write;

use serde::Serialize;

use crate::logging::escape_controls;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// `--output`, of the commands that print rows.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct OutputArgs {
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Writes `text` to stdout. A closed pipe (`| head`) ends the output quietly instead of failing.
pub fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Prints `rows` as JSON or as a table with `header`, each row made by `cells`.
pub fn print<T: Serialize>(
    output: Output,
    rows: &[T],
    header: &[&str],
    cells: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<()> {
    match output {
        Output::Json => emit(&format!("{}\n", serde_json::to_string_pretty(rows)?)),
        Output::Table => emit(&table(header, &rows.iter().map(cells).collect::<Vec<_>>())),
    }
}

/// Rows as an aligned table with a header. Cells come from the store (pod names, container
/// IDs, keys), which whoever ran a CNI call or edited the store chose: control characters are
/// written escaped, so a cell can neither break the table's lines nor drive the terminal.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .map(|cell| escape_controls(cell, |_| false))
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", text.join("  ").trim_end())
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_cannot_break_a_line_or_drive_the_terminal() {
        let rows = [vec![
            "ns/a\nFORGED  row".to_string(),
            "\u{1b}[2Jx\ty".to_string(),
        ]];
        let text = table(&["POD", "CONTAINER"], &rows);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(!text.contains('\u{1b}') && !text.contains('\t'), "{text}");
        assert!(
            text.contains("ns/a\\nFORGED  row  \\u{1b}[2Jx\\ty"),
            "{text}"
        );
    }
}
