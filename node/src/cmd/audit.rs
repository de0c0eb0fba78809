//! `pdsno audit`: read a node's signed, hash-chained event log from its data directory.
//!
//! - `pdsno audit verify --data-dir D [--public-key B64]` walks the whole chain: each row's
//!   hash, its link to the previous row and its Ed25519 signature. It prints
//!   `OK events=N signer=KEY` (exit 0) or the first broken link (exit 1). By default the
//!   signer is the node's own identity key from `D`; `--public-key` checks against a key
//!   pinned elsewhere (someone who can write `D` could otherwise re-sign a forged log).
//! - `pdsno audit tail --data-dir D [-n N] [--follow] [--json]` prints the last events
//!   (with `--json` one object per line: `seq`, `event_id`, `event_type`, `actor`,
//!   `subject`, `action`, `decision`, `timestamp`, `details`, `hash`).
//!
//! Both open the NIB read-only, so they can run beside the live node.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use pdsno_shared::keys::PublicKey;
use rusqlite::{Connection, OpenFlags};

use crate::nib::{EventRow, verify_chain};

/// `pdsno audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the event chain; report the first broken link.
    Verify(VerifyArgs),
    /// Show the latest events.
    Tail(TailArgs),
}

/// `pdsno audit verify` arguments.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The node's data directory.
    #[arg(long, env = "PDSNO_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The signer's Ed25519 public key (base64); default: the node's own identity key.
    #[arg(long)]
    pub public_key: Option<String>,
}

/// `pdsno audit tail` arguments.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// The node's data directory.
    #[arg(long, env = "PDSNO_DATA_DIR")]
    pub data_dir: PathBuf,
    /// How many events.
    #[arg(short = 'n', long, default_value_t = 20)]
    pub lines: usize,
    /// Keep printing new events.
    #[arg(short, long)]
    pub follow: bool,
    /// One JSON object per line (an error too: `{"error": "..."}`).
    #[arg(long)]
    pub json: bool,
}

fn open(dir: &Path) -> Result<Connection, String> {
    let path = dir.join("nib.db");
    if !path.exists() {
        return Err(format!(
            "{}: no NIB here (give --data-dir the data directory of a node that has run)",
            path.display()
        ));
    }
    let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

fn signer(a: &VerifyArgs) -> Result<PublicKey, String> {
    if let Some(k) = &a.public_key {
        return PublicKey::from_base64(k).map_err(|e| format!("--public-key: {e}"));
    }
    let key_file = a.data_dir.join(crate::identity::KEY_FILE);
    if !key_file.exists() {
        return Err(format!(
            "{}: no identity key (give --public-key)",
            key_file.display()
        ));
    }
    crate::identity::load_or_create(&a.data_dir)
        .map(|(k, _)| k.public())
        .map_err(|e| e.to_string())
}

/// Verifies the chain: `Ok(Ok(n))`, `Ok(Err(broken link))`, or `Err` when it cannot be read.
///
/// # Errors
/// No NIB, no key, or an SQLite failure.
pub fn verify(a: &VerifyArgs) -> Result<(PublicKey, Result<u64, crate::nib::BrokenLink>), String> {
    let key = signer(a)?;
    let conn = open(&a.data_dir)?;
    let r = verify_chain(&conn, &key).map_err(|e| e.to_string())?;
    Ok((key, r))
}

fn line(e: &EventRow, json: bool) -> String {
    if json {
        let mut m = pdsno_shared::json::Map::new();
        m.insert("seq".into(), e.seq.into());
        m.insert("event_id".into(), e.event_id.clone().into());
        m.insert("event_type".into(), e.event_type.clone().into());
        m.insert("actor".into(), e.actor.clone().into());
        m.insert(
            "subject".into(),
            e.subject
                .clone()
                .map_or(pdsno_shared::json::Value::Null, Into::into),
        );
        m.insert("action".into(), e.action.clone().into());
        m.insert(
            "decision".into(),
            e.decision
                .clone()
                .map_or(pdsno_shared::json::Value::Null, Into::into),
        );
        m.insert("timestamp".into(), e.timestamp.clone().into());
        m.insert(
            "details".into(),
            pdsno_shared::json::parse(e.details.as_bytes())
                .unwrap_or_else(|_| e.details.clone().into()),
        );
        m.insert("hash".into(), e.hash.clone().into());
        pdsno_shared::json::to_canonical_string(&pdsno_shared::json::Value::Object(m))
    } else {
        format!(
            "{:>6} {} {:<24} actor={} subject={} decision={} {}",
            e.seq,
            e.timestamp,
            e.event_type,
            e.actor,
            e.subject.as_deref().unwrap_or("-"),
            e.decision.as_deref().unwrap_or("-"),
            e.details
        )
    }
}

fn tail(a: &TailArgs) -> Result<(), String> {
    let conn = open(&a.data_dir)?;
    let last: i64 = conn
        .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    let mut after = (last - a.lines as i64).max(0);
    loop {
        let rows = crate::nib::events::list(&conn, after, 1000).map_err(|e| e.to_string())?;
        for e in &rows {
            println!("{}", line(e, a.json));
            after = e.seq;
        }
        if !a.follow {
            return Ok(());
        }
        if rows.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Runs a `pdsno audit` subcommand.
pub fn run(c: &AuditCommand) -> ExitCode {
    match c {
        AuditCommand::Verify(a) => match verify(a) {
            Ok((key, Ok(n))) => {
                println!("OK events={n} signer={}", key.to_base64());
                ExitCode::SUCCESS
            }
            Ok((_, Err(broken))) => {
                println!("BROKEN seq={} reason={}", broken.seq, broken.reason);
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("pdsno audit verify: {e}");
                ExitCode::from(2)
            }
        },
        AuditCommand::Tail(a) => match tail(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) if a.json => super::output::fail_with(true, 2, e),
            Err(e) => {
                eprintln!("pdsno audit tail: {e}");
                ExitCode::from(2)
            }
        },
    }
}
