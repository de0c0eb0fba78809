//! `pdsno completions SHELL` and `pdsno man`: shell completion scripts and manual pages,
//! generated from the command line's own definition (so they never drift from it).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use clap_complete::Shell;

/// `pdsno completions` arguments.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// `pdsno man` arguments.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write every page here (pdsno.1, and one per subcommand such as pdsno-global.1 and
    /// pdsno-keys-list.1); the directory is created if needed. Without it, pdsno.1 goes to
    /// stdout.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

fn command() -> clap::Command {
    // As the help shows it: each tier with its own settings, grouped.
    crate::cli::command()
}

/// Runs `pdsno completions`: the script on stdout.
pub fn completions(a: &CompletionsArgs) -> ExitCode {
    let mut cmd = command();
    let mut out = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "pdsno", &mut out);
    write_stdout(&out)
}

fn write_stdout(bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`| head`) is not an error worth a message.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write to stdout: {e}");
            ExitCode::from(1)
        }
    }
}

/// Writes the page of `cmd` and of each of its subcommands (not hidden ones) into `dir`;
/// returns the files written.
fn write_pages(cmd: &clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = vec![clap_mangen::Man::new(cmd.clone()).generate_to(dir)?];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        written.extend(write_pages(sub, dir)?);
    }
    Ok(written)
}

/// Runs `pdsno man`.
pub fn man(a: &ManArgs) -> ExitCode {
    // Built, so that each subcommand's page is named after its full path (pdsno-keys-list).
    let mut cmd = command().disable_help_subcommand(true);
    cmd.build();
    let Some(dir) = &a.out_dir else {
        let mut out = Vec::new();
        if let Err(e) = clap_mangen::Man::new(cmd).render(&mut out) {
            eprintln!("error: cannot render the manual page: {e}");
            return ExitCode::from(1);
        }
        return write_stdout(&out);
    };
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!(
            "error: cannot create {}: {e} (give --out-dir a directory you can write)",
            dir.display()
        );
        return ExitCode::from(1);
    }
    match write_pages(&cmd, dir) {
        Ok(files) => {
            for f in &files {
                println!("{}", f.display());
            }
            eprintln!(
                "{} pages in {}; read one with `man -l {}`",
                files.len(),
                dir.display(),
                dir.join("pdsno.1").display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "error: cannot write the pages into {}: {e} (give --out-dir a directory you can write)",
                dir.display()
            );
            ExitCode::from(1)
        }
    }
}
