//! `pdsno certs`: a lab certificate authority in two commands.
//!
//! - `pdsno certs init --dir D` writes `D/ca.pem` and `D/ca.key` (ECDSA P-256, mode 0600);
//! - `pdsno certs issue --dir D --id ID` writes `D/ID.pem` and `D/ID.key`: a certificate
//!   for the purposes of `--role` (`both` by default: server and client authentication;
//!   `server`; `client`), naming `ID` and every `--san`, plus `localhost`, `127.0.0.1` and
//!   `::1` when it may serve. `--controller-id CID` adds the URI
//!   `urn:pdsno:controller:CID`: the controller the certificate belongs to. A child pinned
//!   to its parent with `--parent-id CID` accepts only a parent certificate naming `CID`,
//!   and a node refuses a message whose sender is not the controller named by the client
//!   certificate it came with.
//!
//! Which role for which tier: the global and regional controllers serve their children and
//! (a regional) call their parent: `both`. A local controller calls its regional parent;
//! it also serves gRPC/REST (operators, `/metrics`), so it gets `both` when those listeners
//! use TLS, else `client`. A serving local controller's certificate is valid for a server
//! name like any other: what keeps it from posing as a parent is the child's pin on the
//! parent (`--parent-id`, `--parent-public-key`).
//!
//! The CA's name is derived from its key, so issuing needs only the key (the name and the key
//! identifier the issued certificate refers to are recomputed from it). Keep `ca.key`
//! secret; `ca.pem` is what every node trusts (`--tls-ca D/ca.pem`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// The CA's common name: this prefix and a fingerprint of its key, so two labs' CAs never
/// share a name (a certificate of the other lab then fails as "unknown issuer").
pub const CA_NAME: &str = "pdsno lab CA";

fn ca_common_name(key: &KeyPair) -> String {
    use sha2::Digest as _;
    let fp = sha2::Sha256::digest(key.public_key_raw());
    format!("{CA_NAME} {}", hex::encode(&fp[..6]))
}

/// `pdsno certs` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a lab CA (ca.pem, ca.key) in --dir.
    Init(InitArgs),
    /// Issue a controller certificate (ID.pem, ID.key) signed by the CA in --dir.
    Issue(IssueArgs),
}

/// `pdsno certs init` arguments.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Where the CA lives.
    #[arg(long, default_value = "certs")]
    pub dir: PathBuf,
    /// Validity in days.
    #[arg(long, default_value_t = 3650)]
    pub days: i64,
    /// Replace an existing CA (every issued certificate stops being trusted).
    #[arg(long)]
    pub force: bool,
}

/// What an issued certificate may be used for (its extended key usage).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CertRole {
    /// TLS server only (a listener).
    Server,
    /// TLS client only (a link to a parent, an operator tool).
    Client,
    /// Both (a global or regional controller, a serving local controller).
    Both,
}

impl CertRole {
    fn serves(self) -> bool {
        matches!(self, CertRole::Server | CertRole::Both)
    }

    fn calls(self) -> bool {
        matches!(self, CertRole::Client | CertRole::Both)
    }
}

/// `pdsno certs issue` arguments.
#[derive(Debug, Args)]
pub struct IssueArgs {
    /// Where the CA lives (and the certificate is written).
    #[arg(long, default_value = "certs")]
    pub dir: PathBuf,
    /// The controller id (or any name): the certificate's common name and first DNS name.
    #[arg(long)]
    pub id: String,
    /// More names (DNS names or IP addresses) the certificate is valid for.
    #[arg(long = "san", value_name = "NAME")]
    pub sans: Vec<String>,
    /// What the certificate may be used for: server, client or both.
    #[arg(long, value_enum, default_value_t = CertRole::Both)]
    pub role: CertRole,
    /// The controller the certificate belongs to (e.g. global_cntl_1,
    /// regional_cntl_zone-A_1): added as the URI urn:pdsno:controller:ID.
    #[arg(long, value_name = "ID")]
    pub controller_id: Option<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 825)]
    pub days: i64,
    /// Start the validity this many days in the past (with a small --days, this makes an
    /// already expired certificate, for testing clients).
    #[arg(long, default_value_t = 0)]
    pub backdate_days: i64,
}

fn write_file(path: &Path, text: &str, private: bool) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())
}

fn ca_params(key: &KeyPair, not_before: OffsetDateTime, days: i64) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, ca_common_name(key));
    dn.push(DnType::OrganizationName, "pdsno");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = not_before;
    p.not_after = not_before + Duration::days(days);
    p
}

/// Creates the CA; returns the paths written.
///
/// # Errors
/// An existing CA without `force`, or a file that cannot be written.
pub fn init(a: &InitArgs) -> Result<(PathBuf, PathBuf), String> {
    if a.days < 1 {
        return Err("--days must be at least 1".into());
    }
    std::fs::create_dir_all(&a.dir)
        .map_err(|e| format!("cannot create {}: {e}", a.dir.display()))?;
    let (cert_path, key_path) = (a.dir.join("ca.pem"), a.dir.join("ca.key"));
    if !a.force && (cert_path.exists() || key_path.exists()) {
        return Err(format!(
            "{} already holds a CA (use --force to replace it; certificates it issued stop being trusted)",
            a.dir.display()
        ));
    }
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let now = OffsetDateTime::now_utc() - Duration::minutes(5);
    let cert = ca_params(&key, now, a.days)
        .self_signed(&key)
        .map_err(|e| e.to_string())?;
    write_file(&key_path, &key.serialize_pem(), true)
        .map_err(|e| format!("cannot write {}: {e}", key_path.display()))?;
    write_file(&cert_path, &cert.pem(), false)
        .map_err(|e| format!("cannot write {}: {e}", cert_path.display()))?;
    Ok((cert_path, key_path))
}

/// Issues a certificate; returns the paths written.
///
/// # Errors
/// No CA in the directory, an unusable name, or a file that cannot be written.
pub fn issue(a: &IssueArgs) -> Result<(PathBuf, PathBuf), String> {
    if a.days < 1 {
        return Err("--days must be at least 1".into());
    }
    if a.id.is_empty()
        || a.id.len() > 64
        || !a
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(format!(
            "--id {:?}: use 1-64 letters, digits, '-', '_' or '.'",
            a.id
        ));
    }
    let ca_key_path = a.dir.join("ca.key");
    let ca_pem = std::fs::read_to_string(&ca_key_path).map_err(|e| {
        format!(
            "cannot read the CA key {} ({e}); run `pdsno certs init --dir {}` first",
            ca_key_path.display(),
            a.dir.display()
        )
    })?;
    let ca_key = KeyPair::from_pem(&ca_pem)
        .map_err(|e| format!("{}: not a CA key: {e}", ca_key_path.display()))?;
    let issuer = Issuer::new(ca_params(&ca_key, OffsetDateTime::now_utc(), 1), ca_key);

    if let Some(c) = &a.controller_id
        && !pdsno_shared::ids::is_valid_controller_id(c)
    {
        return Err(format!(
            "--controller-id {c:?}: not a valid controller id (1-128 of [A-Za-z0-9_.-])"
        ));
    }
    let mut names = vec![a.id.clone()];
    names.extend(a.sans.iter().cloned());
    if a.role.serves() {
        names.extend(["localhost", "127.0.0.1", "::1"].map(str::to_owned));
    }
    let mut sans = Vec::new();
    for n in &names {
        let san = match n.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                n.clone()
                    .try_into()
                    .map_err(|e| format!("--san {n:?}: {e}"))?,
            ),
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    if let Some(c) = &a.controller_id {
        sans.push(SanType::URI(
            format!("{}{c}", crate::tls::CONTROLLER_URN)
                .try_into()
                .map_err(|e| format!("--controller-id {c:?}: {e}"))?,
        ));
    }
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, a.id.as_str());
    dn.push(DnType::OrganizationName, "pdsno");
    p.distinguished_name = dn;
    p.subject_alt_names = sans;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = [
        (a.role.serves(), ExtendedKeyUsagePurpose::ServerAuth),
        (a.role.calls(), ExtendedKeyUsagePurpose::ClientAuth),
    ]
    .into_iter()
    .filter_map(|(on, eku)| on.then_some(eku))
    .collect();
    p.use_authority_key_identifier_extension = true;
    let start = OffsetDateTime::now_utc() - Duration::minutes(5) - Duration::days(a.backdate_days);
    p.not_before = start;
    p.not_after = start + Duration::days(a.days);
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = p.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
    let (cert_path, key_path) = (
        a.dir.join(format!("{}.pem", a.id)),
        a.dir.join(format!("{}.key", a.id)),
    );
    write_file(&key_path, &key.serialize_pem(), true)
        .map_err(|e| format!("cannot write {}: {e}", key_path.display()))?;
    write_file(&cert_path, &cert.pem(), false)
        .map_err(|e| format!("cannot write {}: {e}", cert_path.display()))?;
    Ok((cert_path, key_path))
}

/// Runs a `pdsno certs` subcommand.
pub fn run(c: &CertsCommand) -> ExitCode {
    let r = match c {
        CertsCommand::Init(a) => init(a),
        CertsCommand::Issue(a) => issue(a),
    };
    match r {
        Ok((cert, key)) => {
            println!("certificate {}", cert.display());
            println!("key {}", key.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pdsno certs: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue_args(dir: &Path, id: &str) -> IssueArgs {
        IssueArgs {
            dir: dir.to_path_buf(),
            id: id.into(),
            sans: vec!["gc.example.net".into(), "10.1.2.3".into()],
            role: CertRole::Both,
            controller_id: None,
            days: 30,
            backdate_days: 0,
        }
    }

    #[test]
    fn a_lab_ca_issues_certificates_that_verify_under_it_only() {
        let d = tempfile::tempdir().expect("tempdir");
        let init_args = InitArgs {
            dir: d.path().join("a"),
            days: 365,
            force: false,
        };
        init(&init_args).expect("init");
        let again = init(&init_args).expect_err("an existing CA is kept");
        assert!(again.contains("--force"), "{again}");
        let (cert, key) = issue(&issue_args(&init_args.dir, "global")).expect("issue");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let opts = |ca: PathBuf| crate::tls::TlsOptions {
            cert: Some(cert.clone()),
            key: Some(key.clone()),
            ca: Some(ca),
            ..Default::default()
        };
        crate::tls::TlsMaterial::load(&opts(init_args.dir.join("ca.pem")))
            .expect("verifies under its CA");
        // Another lab's CA does not accept it.
        let other = InitArgs {
            dir: d.path().join("b"),
            days: 365,
            force: false,
        };
        init(&other).expect("init b");
        let e =
            crate::tls::TlsMaterial::load(&opts(other.dir.join("ca.pem"))).expect_err("foreign CA");
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");

        let bad = IssueArgs {
            controller_id: Some("no spaces allowed".into()),
            ..issue_args(&init_args.dir, "x")
        };
        let bad = issue(&bad).expect_err("bad controller id");
        assert!(bad.contains("--controller-id"), "{bad}");
        let bad = issue(&issue_args(&init_args.dir, "bad id/../x")).expect_err("bad id");
        assert!(bad.contains("--id"), "{bad}");
        let none = issue(&issue_args(&d.path().join("missing"), "x")).expect_err("no CA");
        assert!(none.contains("certs init"), "{none}");
    }

    fn leaf(path: &Path) -> rustls::pki_types::CertificateDer<'static> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(path).expect("certificate")
    }

    #[test]
    fn roles_set_the_purpose_and_the_controller_is_named() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().to_path_buf();
        init(&InitArgs {
            dir: dir.clone(),
            days: 365,
            force: false,
        })
        .expect("init");
        let (client, client_key) = issue(&IssueArgs {
            role: CertRole::Client,
            controller_id: Some("local_cntl_zone-A_1".into()),
            sans: Vec::new(),
            ..issue_args(&dir, "lc")
        })
        .expect("client");
        let (both, _) = issue(&IssueArgs {
            controller_id: Some("global_cntl_1".into()),
            ..issue_args(&dir, "gc")
        })
        .expect("both");
        assert_eq!(
            crate::tls::controller_ids(&leaf(&client)),
            vec!["local_cntl_zone-A_1".to_owned()]
        );
        assert_eq!(
            crate::tls::controller_ids(&leaf(&both)),
            vec!["global_cntl_1".to_owned()]
        );
        let (plain, _) = issue(&issue_args(&dir, "operator")).expect("plain");
        assert!(crate::tls::controller_ids(&leaf(&plain)).is_empty());

        // A client-only certificate loads as this node's identity (it is valid under the
        // CA), but a TLS client refuses it as a server, for its purpose and (no loopback
        // names) for the name.
        let m = crate::tls::TlsMaterial::load(&crate::tls::TlsOptions {
            cert: Some(client.clone()),
            key: Some(client_key),
            ca: Some(dir.join("ca.pem")),
            ..Default::default()
        })
        .expect("loads")
        .expect("material");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(leaf(&dir.join("ca.pem"))).expect("root");
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            crate::tls::provider(),
        )
        .build()
        .expect("verifier");
        use rustls::client::danger::ServerCertVerifier as _;
        let name = rustls::pki_types::ServerName::try_from("lc").expect("name");
        let e = v
            .verify_server_cert(
                &leaf(&client),
                &[],
                &name,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .expect_err("not a server certificate");
        assert!(e.to_string().contains("extended key usage"), "{e}");
        let gc_name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        v.verify_server_cert(
            &leaf(&both),
            &[],
            &gc_name,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .expect("a serving certificate is valid for loopback");
        assert!(m.has_identity());
    }
}
