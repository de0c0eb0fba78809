//! `pdsno sign` and `pdsno verify`: operators' tools for debugging messages.
//!
//! Exit codes: 0 success; 1 the envelope does not verify (the reason, in the contract's
//! words, is printed on stdout); 2 unusable input (bad JSON, not an envelope, no key).

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use clap::parser::ValueSource;
use pdsno_shared::envelope::Envelope;
use pdsno_shared::json;
use pdsno_shared::keys::{HmacKey, KeyRing, PublicKey};
use pdsno_shared::replay::MemoryNonceStore;
use pdsno_shared::signing::{self, Verifier, VerifyKeys};
use pdsno_shared::time::parse_iso;

/// Largest envelope accepted on stdin.
const MAX_INPUT: u64 = 16 * 1024 * 1024;

/// Where the HMAC key comes from.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The key as hex (at least 32 bytes).
    #[arg(long, value_name = "HEX")]
    pub key_hex: Option<String>,
    /// A file holding the key: hex text, or at least 32 raw bytes.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// A text secret; the key is its SHA-256 (the original's convention). Prefer the
    /// environment variable: command lines are visible to other users.
    #[arg(
        long,
        value_name = "TEXT",
        env = "PDSNO_MESSAGE_SIGNING_SECRET",
        hide_env_values = true
    )]
    pub secret: Option<String>,
    /// Add this `key_id` to the signature (covered by it).
    #[arg(long, value_name = "ID")]
    pub key_id: Option<String>,
}

/// `pdsno sign`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// HMAC key.
    #[command(flatten)]
    pub key: KeyArgs,
    /// Print indented JSON instead of the compact wire form.
    #[arg(long)]
    pub pretty: bool,
}

/// `pdsno verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// HMAC key.
    #[command(flatten)]
    pub key: KeyArgs,
    /// Base64 Ed25519 public key of the sender (for `Ed25519` envelopes).
    #[arg(long, value_name = "BASE64")]
    pub public_key: Option<String>,
    /// Require this sender.
    #[arg(long, value_name = "ID")]
    pub expected_sender: Option<String>,
    /// Check freshness as of this ISO-8601 time instead of now (for captured messages).
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
}

fn usage_error(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(2)
}

/// Resolves the HMAC key; `Ok(None)` when no source was given.
fn resolve_key(k: &KeyArgs, matches: Option<&clap::ArgMatches>) -> Result<Option<HmacKey>, String> {
    let from_cli =
        |id: &str| matches.and_then(|m| m.value_source(id)) == Some(ValueSource::CommandLine);
    let explicit = [
        k.key_hex.is_some(),
        k.key_file.is_some(),
        from_cli("secret"),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if explicit > 1 {
        return Err("give only one of --key-hex, --key-file, --secret".into());
    }
    if let Some(h) = &k.key_hex {
        return HmacKey::from_hex(h)
            .map(Some)
            .map_err(|e| format!("--key-hex: {e}"));
    }
    if let Some(path) = &k.key_file {
        let bytes =
            std::fs::read(path).map_err(|e| format!("--key-file {}: {e}", path.display()))?;
        let text = std::str::from_utf8(&bytes).map(str::trim).unwrap_or("");
        let looks_hex = text.len() >= 64 && text.bytes().all(|b| b.is_ascii_hexdigit());
        let key = if looks_hex {
            HmacKey::from_hex(text)
        } else {
            HmacKey::from_bytes(&bytes)
        };
        return key
            .map(Some)
            .map_err(|e| format!("--key-file {}: {e}", path.display()));
    }
    if let Some(s) = &k.secret {
        if from_cli("secret") {
            eprintln!(
                "warning: --secret on the command line is visible to other users; prefer PDSNO_MESSAGE_SIGNING_SECRET or --key-file"
            );
        }
        return Ok(Some(HmacKey::from_secret_text(s)));
    }
    Ok(None)
}

fn read_envelope() -> Result<Envelope, String> {
    let mut buf = Vec::new();
    std::io::stdin()
        .take(MAX_INPUT + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read stdin: {e}"))?;
    if buf.len() as u64 > MAX_INPUT {
        return Err(format!("input larger than {MAX_INPUT} bytes"));
    }
    Envelope::from_slice(&buf).map_err(|e| format!("not a valid envelope: {e}"))
}

fn print_envelope(e: &Envelope, pretty: bool) {
    if pretty {
        println!("{}", json::to_pretty_string(&e.to_value()));
    } else {
        println!("{}", e.to_json());
    }
}

/// Runs `pdsno sign`.
pub fn sign(a: &SignArgs, matches: Option<&clap::ArgMatches>) -> ExitCode {
    let key = match resolve_key(&a.key, matches) {
        Ok(Some(k)) => k,
        Ok(None) => {
            return usage_error(
                "no key: give --key-hex, --key-file, --secret or set PDSNO_MESSAGE_SIGNING_SECRET",
            );
        }
        Err(e) => return usage_error(e),
    };
    let mut env = match read_envelope() {
        Ok(e) => e,
        Err(e) => return usage_error(e),
    };
    signing::sign_hmac(&mut env, &key, a.key.key_id.as_deref(), chrono::Utc::now());
    print_envelope(&env, a.pretty);
    ExitCode::SUCCESS
}

/// Runs `pdsno verify`.
pub fn verify(a: &VerifyArgs, matches: Option<&clap::ArgMatches>) -> ExitCode {
    let key = match resolve_key(&a.key, matches) {
        Ok(k) => k,
        Err(e) => return usage_error(e),
    };
    let public = match a
        .public_key
        .as_deref()
        .map(PublicKey::from_base64)
        .transpose()
    {
        Ok(p) => p,
        Err(e) => return usage_error(format!("--public-key: {e}")),
    };
    if key.is_none() && public.is_none() {
        return usage_error(
            "no key: give --key-hex, --key-file, --secret, --public-key or set PDSNO_MESSAGE_SIGNING_SECRET",
        );
    }
    let now = match a.at.as_deref().map(parse_iso).transpose() {
        Ok(t) => t.unwrap_or_else(chrono::Utc::now),
        Err(e) => return usage_error(format!("--at: {e}")),
    };
    let env = match read_envelope() {
        Ok(e) => e,
        Err(e) => return usage_error(e),
    };
    let ring = key.map(|k| KeyRing::single(a.key.key_id.clone(), k, now));
    let keys = VerifyKeys {
        hmac: ring.as_ref(),
        ed25519: public.as_ref(),
    };
    let verifier = Verifier::new(MemoryNonceStore::new());
    match verifier.verify(&env, keys, a.expected_sender.as_deref(), now) {
        Ok(_) => {
            println!("OK");
            ExitCode::SUCCESS
        }
        Err(reason) => {
            println!("{reason}");
            ExitCode::from(1)
        }
    }
}
