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
        let hex: String = body.chars().filter(|&c| c != ':').collect();
        if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
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
        ] {
            let e = bad.parse::<Fingerprint>().unwrap_err();
            assert!(e.contains("64 hex digits"), "{bad}: {e}");
        }
    }
}
