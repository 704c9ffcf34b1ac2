//! The cluster's TLS identity: one certificate that every rank presents and every rank
//! pins as its only trust root, in both directions (mutual TLS).
//!
//! [`ClusterIdentity::generate`] makes a fresh self-signed certificate per run (a launcher
//! writes it to PEM files for its children with [`ClusterIdentity::write_pem`]);
//! [`ClusterIdentity::from_pem_files`] loads one made by an operator, optionally with a
//! separate CA file. A peer presenting any certificate that does not chain to the trust
//! roots fails the TLS handshake before a single application byte is exchanged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// Name every cluster certificate is issued for and every rank checks.
pub const CLUSTER_SERVER_NAME: &str = "ringtune.cluster";

/// ALPN protocol id on every link.
pub(crate) const ALPN: &[u8] = b"ringtune-ring/1";

/// Certificate chain, private key and trust roots of this rank.
#[derive(Debug)]
pub struct ClusterIdentity {
    /// Our certificate chain (leaf first).
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// Our private key.
    pub key: PrivateKeyDer<'static>,
    /// Certificates we accept peers' chains against.
    pub trust_roots: Vec<CertificateDer<'static>>,
}

impl Clone for ClusterIdentity {
    fn clone(&self) -> Self {
        Self {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
            trust_roots: self.trust_roots.clone(),
        }
    }
}

fn cred(e: impl std::fmt::Display) -> Error {
    Error::Credentials(e.to_string())
}

impl ClusterIdentity {
    /// A fresh self-signed certificate for [`CLUSTER_SERVER_NAME`], which is also the only
    /// trust root.
    pub fn generate() -> Result<Self> {
        let ck = rcgen::generate_simple_self_signed(vec![CLUSTER_SERVER_NAME.to_string()])
            .map_err(cred)?;
        let der = ck.cert.der().clone();
        Ok(Self {
            cert_chain: vec![der.clone()],
            key: PrivateKeyDer::try_from(ck.signing_key.serialize_der()).map_err(cred)?,
            trust_roots: vec![der],
        })
    }

    /// Loads a PEM certificate chain and key; trust roots from `ca` or, if `None`, the
    /// certificate itself (a self-signed cluster certificate).
    pub fn from_pem_files(cert: &Path, key: &Path, ca: Option<&Path>) -> Result<Self> {
        let certs = |p: &Path| -> Result<Vec<CertificateDer<'static>>> {
            let v: Vec<_> = CertificateDer::pem_file_iter(p)
                .map_err(|e| Error::Credentials(format!("{}: {e}", p.display())))?
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| Error::Credentials(format!("{}: {e}", p.display())))?;
            if v.is_empty() {
                return Err(Error::Credentials(format!(
                    "{}: no certificate in file",
                    p.display()
                )));
            }
            Ok(v)
        };
        let cert_chain = certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| Error::Credentials(format!("{}: {e}", key.display())))?;
        let trust_roots = match ca {
            Some(ca) => certs(ca)?,
            None => vec![cert_chain[0].clone()],
        };
        Ok(Self {
            cert_chain,
            key,
            trust_roots,
        })
    }

    /// Writes `cluster.crt` and `cluster.key` (mode 0600) into `dir`; returns their paths.
    pub fn write_pem(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        use rustls::pki_types::pem::SectionKind;
        let io = |context: String| move |source| Error::Io { context, source };
        let cert_path = dir.join("cluster.crt");
        let key_path = dir.join("cluster.key");
        let mut pem = String::new();
        for c in &self.cert_chain {
            pem.push_str(&pem_encode("CERTIFICATE", c.as_ref()));
        }
        std::fs::write(&cert_path, pem).map_err(io(format!("writing {}", cert_path.display())))?;
        let kind = match &self.key {
            PrivateKeyDer::Pkcs8(_) => SectionKind::PrivateKey,
            PrivateKeyDer::Sec1(_) => SectionKind::EcPrivateKey,
            _ => SectionKind::RsaPrivateKey,
        };
        let label = match kind {
            SectionKind::EcPrivateKey => "EC PRIVATE KEY",
            SectionKind::RsaPrivateKey => "RSA PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        {
            use std::io::Write;
            #[cfg(unix)]
            use std::os::unix::fs::OpenOptionsExt;
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create(true).truncate(true);
            #[cfg(unix)]
            o.mode(0o600);
            let mut f = o
                .open(&key_path)
                .map_err(io(format!("writing {}", key_path.display())))?;
            f.write_all(pem_encode(label, self.key.secret_der()).as_bytes())
                .map_err(io(format!("writing {}", key_path.display())))?;
        }
        Ok((cert_path, key_path))
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.trust_roots {
            roots
                .add(c.clone())
                .map_err(|e| Error::Credentials(format!("trust root: {e}")))?;
        }
        Ok(Arc::new(roots))
    }

    /// ring's provider with AES-128-GCM preferred: it is ~1.5x faster than AES-256-GCM
    /// (fewer rounds) and gradients are the bulk of what we encrypt. (ring's default order
    /// puts AES-256 first.)
    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        use rustls::crypto::ring::cipher_suite as cs;
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites = vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ];
        Arc::new(p)
    }

    /// Server-side config: presents our chain, requires a client certificate from the roots.
    pub(crate) fn server_config(&self) -> Result<rustls::ServerConfig> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots()?,
            Self::provider(),
        )
        .build()
        .map_err(cred)?;
        let mut c = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cred)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(cred)?;
        c.alpn_protocols = vec![ALPN.to_vec()];
        Ok(c)
    }

    /// Client-side config: trusts only the roots, presents our chain.
    pub(crate) fn client_config(&self) -> Result<rustls::ClientConfig> {
        let mut c = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cred)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(cred)?;
        c.alpn_protocols = vec![ALPN.to_vec()];
        Ok(c)
    }
}

/// The SHA-256 of a certificate's DER encoding: what a node pins the coordinator's
/// certificate by (`ringtune node --coordinator-fingerprint`). Shown as `sha256:` and 64
/// lowercase hex digits; parsed from that, bare hex, or OpenSSL's colon-separated form
/// (`openssl x509 -noout -fingerprint -sha256`), in any case.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(cert: &CertificateDer<'_>) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        let body = ["sha256 fingerprint=", "sha256:", "sha256="]
            .iter()
            .find_map(|p| lower.strip_prefix(p))
            .unwrap_or(&lower);
        // Colons, if any, separate every byte pair (OpenSSL's form), nowhere else.
        let pairs_ok = !body.contains(':') || body.split(':').all(|p| p.len() == 2);
        let hex: String = body.chars().filter(|&c| c != ':').collect();
        if !pairs_ok || hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "'{t}' is not a SHA-256 certificate fingerprint: expected 64 hex digits, \
                 optionally after 'sha256:' or colon-separated (as the coordinator prints it: \
                 sha256:9f86d0…)"
            ));
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        Ok(Self(out))
    }
}

/// A certificate's validity period, read from its DER encoding, as UTC instants written
/// `YYYYMMDDHHMMSS` (so that they compare as strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validity {
    pub not_before: String,
    pub not_after: String,
}

impl Validity {
    /// `Certificate → tbsCertificate → validity` (RFC 5280 §4.1); `None` for anything that
    /// is not a well-formed X.509 certificate.
    pub fn of(cert: &CertificateDer<'_>) -> Option<Self> {
        let (tag, cert, _) = der_item(cert.as_ref())?;
        let (tag2, tbs, _) = der_item(cert)?;
        if tag != 0x30 || tag2 != 0x30 {
            return None;
        }
        let mut rest = tbs;
        let (t, _, r) = der_item(rest)?;
        // [0] EXPLICIT version is optional (absent means v1).
        if t == 0xa0 {
            rest = r;
        }
        // serialNumber, signature, issuer, then validity.
        for want in [0x02, 0x30, 0x30] {
            let (t, _, r) = der_item(rest)?;
            if t != want {
                return None;
            }
            rest = r;
        }
        let (t, validity, _) = der_item(rest)?;
        if t != 0x30 {
            return None;
        }
        let (t1, nb, r) = der_item(validity)?;
        let (t2, na, _) = der_item(r)?;
        Some(Self {
            not_before: der_time(t1, nb)?,
            not_after: der_time(t2, na)?,
        })
    }

    /// [`Validity::problem`] for a certificate, now: `None` when it is fine or its dates
    /// cannot be read.
    pub fn problem_now(cert: &CertificateDer<'_>, days: u64) -> Option<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs();
        Self::of(cert)?.problem(now, days)
    }

    /// What is wrong with using the certificate `days` days after `now` (seconds since the
    /// Unix epoch), or `None`: expired, not valid yet, or (with `days > 0`) expiring by then.
    pub fn problem(&self, now: u64, days: u64) -> Option<String> {
        let at = |secs: u64| utc_digits(secs);
        let show = |d: &str| {
            format!(
                "{}-{}-{} {}:{}:{} UTC",
                &d[0..4],
                &d[4..6],
                &d[6..8],
                &d[8..10],
                &d[10..12],
                &d[12..14]
            )
        };
        let now_d = at(now);
        if now_d < self.not_before {
            return Some(format!("is not valid before {}", show(&self.not_before)));
        }
        if now_d > self.not_after {
            return Some(format!("expired on {}", show(&self.not_after)));
        }
        if days > 0 && at(now + days * 86_400) > self.not_after {
            return Some(format!("expires on {}", show(&self.not_after)));
        }
        None
    }
}

/// One DER item at the start of `b`: (tag, contents, the bytes after it). Single-byte tags
/// and definite lengths only, which is all DER allows for what [`Validity::of`] reads.
fn der_item(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&l0, mut b) = b.split_first()?;
    let len = if l0 < 0x80 {
        l0 as usize
    } else {
        let n = (l0 & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n].iter().fold(0usize, |a, &x| a << 8 | x as usize);
        b = &b[n..];
        len
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049 as RFC 5280 says) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`) as `YYYYMMDDHHMMSS`.
fn der_time(tag: u8, b: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(b).ok()?.strip_suffix('Z')?;
    if !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    match (tag, s.len()) {
        (0x17, 12) => {
            let century = if &s[..2] < "50" { "20" } else { "19" };
            Some(format!("{century}{s}"))
        }
        (0x18, 14) => Some(s.to_string()),
        _ => None,
    }
}

/// Seconds since the Unix epoch as UTC `YYYYMMDDHHMMSS` (the proleptic Gregorian calendar,
/// days to a civil date as in Howard Hinnant's `civil_from_days`).
fn utc_digits(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for c in der.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                b64.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut s = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).unwrap());
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_files_round_trip() {
        let id = ClusterIdentity::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = id.write_pem(dir.path()).unwrap();
        let back = ClusterIdentity::from_pem_files(&c, &k, None).unwrap();
        assert_eq!(back.cert_chain, id.cert_chain);
        assert_eq!(back.key.secret_der(), id.key.secret_der());
        assert_eq!(back.trust_roots, id.cert_chain);
        back.server_config().unwrap();
        back.client_config().unwrap();
        let missing =
            ClusterIdentity::from_pem_files(&dir.path().join("nope.crt"), &k, None).unwrap_err();
        assert!(missing.to_string().contains("nope.crt"), "{missing}");
    }

    #[test]
    fn fingerprints_print_and_parse_in_the_usual_forms() {
        let id = ClusterIdentity::generate().unwrap();
        let fp = Fingerprint::of(&id.cert_chain[0]);
        let shown = fp.to_string();
        assert!(
            shown.starts_with("sha256:") && shown.len() == 7 + 64,
            "{shown}"
        );
        assert_eq!(shown.parse::<Fingerprint>().unwrap(), fp);
        let hex = &shown[7..];
        assert_eq!(hex.parse::<Fingerprint>().unwrap(), fp);
        // OpenSSL's form: upper case, colon-separated, with its label.
        let colons: Vec<String> = fp.0.iter().map(|b| format!("{b:02X}")).collect();
        let openssl = format!("SHA256 Fingerprint={}\n", colons.join(":"));
        assert_eq!(openssl.parse::<Fingerprint>().unwrap(), fp);
        // Another certificate has another fingerprint.
        let other = ClusterIdentity::generate().unwrap();
        assert_ne!(Fingerprint::of(&other.cert_chain[0]), fp);
        for bad in [
            "",
            "sha256:",
            &hex[1..],
            &format!("{hex}00"),
            &format!("g{}", &hex[1..]),
            // colons anywhere but between byte pairs
            &format!("{}:{}", &hex[..3], &hex[3..]),
            &format!(":{hex}"),
            &colons.join("::"),
        ] {
            let e = bad.parse::<Fingerprint>().unwrap_err();
            assert!(e.contains("64 hex digits"), "{bad}: {e}");
        }
    }

    /// A certificate valid from `from` to `to` (years, 1 January).
    fn cert_valid(from: i32, to: i32) -> CertificateDer<'static> {
        let mut p = rcgen::CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string()]).unwrap();
        p.not_before = rcgen::date_time_ymd(from, 1, 1);
        p.not_after = rcgen::date_time_ymd(to, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn validity_is_read_from_the_certificate() {
        // 2026-11-27 12:00:00 UTC
        let now = 1_795_780_800;
        assert_eq!(utc_digits(now), "20261127120000");
        assert_eq!(utc_digits(0), "19700101000000");
        assert_eq!(utc_digits(951_782_400), "20000229000000");
        // UTCTime (before 2050) and GeneralizedTime (2050 on) both parse.
        let v = Validity::of(&cert_valid(2020, 2060)).unwrap();
        assert_eq!(v.not_before, "20200101000000");
        assert_eq!(v.not_after, "20600101000000");
        assert_eq!(v.problem(now, 30), None);
        let expired = Validity::of(&cert_valid(2020, 2025)).unwrap();
        assert_eq!(
            expired.problem(now, 0).as_deref(),
            Some("expired on 2025-01-01 00:00:00 UTC")
        );
        let early = Validity::of(&cert_valid(2027, 2030)).unwrap();
        assert_eq!(
            early.problem(now, 0).as_deref(),
            Some("is not valid before 2027-01-01 00:00:00 UTC")
        );
        let soon = Validity::of(&cert_valid(2020, 2026 + 1)).unwrap();
        assert_eq!(soon.problem(now, 7), None);
        assert_eq!(
            soon.problem(now, 40).as_deref(),
            Some("expires on 2027-01-01 00:00:00 UTC")
        );
        // The generated cluster certificate, and garbage.
        let id = ClusterIdentity::generate().unwrap();
        assert!(Validity::of(&id.cert_chain[0]).is_some());
        assert_eq!(
            Validity::of(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])),
            None
        );
        let mut cut = id.cert_chain[0].as_ref().to_vec();
        cut.truncate(cut.len() / 2);
        assert_eq!(Validity::of(&CertificateDer::from(cut)), None);
    }
}
