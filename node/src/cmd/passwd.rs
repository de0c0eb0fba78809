//! `pdsno passwd`: hash an operator password for `[[mqtt_users]]` (or a `--user-file`).
//!
//! The password is read from `--password-file` or the first line of stdin, never from the
//! command line, and never echoed. The output is an Argon2id PHC string, the same the
//! broker checks passwords against, so it goes as is into `password_hash`.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use pdsno_broker::OperatorAccount;
use zeroize::Zeroizing;

/// `pdsno passwd` arguments.
#[derive(Debug, Args)]
pub struct PasswdArgs {
    /// Read the password from this file (its first line) instead of stdin.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Print a whole `[[mqtt_users]]` TOML entry for this account name instead of the hash.
    #[arg(long, value_name = "NAME")]
    pub toml: Option<String>,
    /// With --toml: the account may only subscribe.
    #[arg(long, requires = "toml")]
    pub read_only: bool,
}

fn first_line(text: &str) -> Zeroizing<String> {
    Zeroizing::new(
        text.lines()
            .next()
            .unwrap_or_default()
            .trim_end_matches('\r')
            .to_owned(),
    )
}

fn password(a: &PasswdArgs) -> Result<Zeroizing<String>, String> {
    match &a.password_file {
        Some(p) => {
            let text = Zeroizing::new(
                std::fs::read_to_string(p)
                    .map_err(|e| format!("--password-file {}: {e}", p.display()))?,
            );
            Ok(first_line(&text))
        }
        None => {
            let mut line = Zeroizing::new(String::new());
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| format!("stdin: {e}"))?;
            Ok(first_line(&line))
        }
    }
}

/// Prints the hash of the password read from the file or stdin.
pub fn run(a: &PasswdArgs) -> ExitCode {
    let pw = match password(a) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if pw.is_empty() {
        eprintln!("error: the password is empty (give it on stdin or in --password-file)");
        return ExitCode::from(2);
    }
    let name = a.toml.as_deref().unwrap_or("operator");
    let account = match OperatorAccount::with_password(name, &pw) {
        Ok(acc) => acc,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    match &a.toml {
        Some(name) => {
            println!("[[mqtt_users]]");
            println!("name = {}", toml_string(name));
            println!("password_hash = {}", toml_string(account.hash()));
            if a.read_only {
                println!("read_only = true");
            }
        }
        None => println!("{}", account.hash()),
    }
    ExitCode::SUCCESS
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
