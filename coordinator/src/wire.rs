//! The control plane's wire: QUIC (TLS 1.3 inside) between the coordinator and each node,
//! one bidirectional stream per node, a mutual cluster-token proof bound to the TLS
//! session, then length-prefixed bincode frames carrying [`NodeMsg`] up and [`Command`]
//! down. QUIC's keep-alives and idle timeout ([`CONTROL_IDLE_TIMEOUT`]) let a node notice a
//! coordinator that vanished without closing anything (a killed process, a dead host).
//!
//! Trust: both ends prove they hold the cluster token with an HMAC over the TLS session's
//! exported keying material (RFC 8446 §7.5): a man in the middle terminates two different
//! sessions, so it can relay neither proof. The node proves first; the coordinator answers
//! a bad proof with [`Refusal::BadToken`] and nothing else, and only after a good one sends
//! the [`Welcome`] (the run config and the per-run ring certificate). The node checks the
//! coordinator's proof before it believes anything in the welcome. The token itself never
//! crosses the wire.
//!
//! On top of that a node can pin the coordinator's certificate ([`ControlTrust`]): by its
//! SHA-256 fingerprint (the coordinator prints it, and the local harness passes it to its
//! children), or by a CA file, against which the coordinator's chain and the host name the
//! node dialed are checked as a browser would. A node with a pin never sends its proof to a
//! coordinator that fails it: the TLS handshake stops first, and the node says why
//! ([`Rejections`]) instead of retrying. The coordinator's control certificate is its own
//! (generated per run, or an operator's from PEM files); the ring certificate in the welcome
//! is a different one, so a node never holds the control certificate's key.

use std::sync::Arc;

use ring::hmac;
use ringtune_collectives::auth::ClusterToken;
pub use ringtune_collectives::tls::Fingerprint;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, Result};
use crate::msg::Refusal;

/// Bumped on any incompatible change to the control messages.
pub const CONTROL_VERSION: u32 = 3;
/// The largest control frame either side accepts (a step order for a large global batch,
/// the welcome with the config and certificate, fit easily).
pub const MAX_CONTROL_FRAME: usize = 4 << 20;
/// ALPN of the control plane (distinct from the ring's, so neither accepts the other).
pub const CONTROL_ALPN: &[u8] = b"ringtune-control/1";
/// The server name nodes ask for unless they check a CA-issued certificate (then it is the
/// host they dialed).
pub const CONTROL_SERVER_NAME: &str = "ringtune-coordinator";
const EXPORTER_LABEL: &[u8] = b"EXPORTER-ringtune-control-proof-v1";

/// The first message of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHello {
    pub version: u32,
    /// HMAC(token, "node" ‖ session keying material).
    pub proof: Vec<u8>,
}

/// The coordinator's answer to a [`NodeHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordHello {
    Welcome(Welcome),
    Refused(Refusal),
}

/// What a node needs to join the run, sent only to a node that proved the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// HMAC(token, "coordinator" ‖ session keying material).
    pub proof: Vec<u8>,
    /// The effective run config (overrides applied) as JSON.
    pub run_config_json: String,
    /// The per-run ring certificate chain (DER) and its PKCS#8 key, shared by every rank.
    pub ring_cert_chain: Vec<Vec<u8>>,
    pub ring_key: Vec<u8>,
}

impl Welcome {
    /// The ring identity carried in the welcome: the chain, its key, and the chain's first
    /// certificate as the only trust root (the per-run self-signed certificate).
    pub fn ring_identity(&self) -> Result<ringtune_collectives::tls::ClusterIdentity> {
        let bad = |reason: &str| Error::Wire {
            peer: "coordinator".into(),
            reason: reason.into(),
        };
        let chain: Vec<CertificateDer<'static>> = self
            .ring_cert_chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let first = chain
            .first()
            .cloned()
            .ok_or_else(|| bad("welcome has no ring certificate"))?;
        let key = PrivateKeyDer::try_from(self.ring_key.clone())
            .map_err(|e| bad(&format!("welcome's ring key: {e}")))?;
        Ok(ringtune_collectives::tls::ClusterIdentity {
            cert_chain: chain,
            key,
            trust_roots: vec![first],
        })
    }
}

/// Which side computes a proof (so one side's proof is never valid for the other).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Node,
    Coordinator,
}

/// HMAC-SHA256 of the side and the session's keying material under the token.
pub fn proof(token: &ClusterToken, side: Side, exporter: &[u8]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.expose());
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(b"ringtune-control-proof-v1\0");
    ctx.update(match side {
        Side::Node => b"node\0".as_slice(),
        Side::Coordinator => b"coordinator\0".as_slice(),
    });
    ctx.update(exporter);
    ctx.sign().as_ref().to_vec()
}

/// Checks a proof in constant time.
pub fn verify(token: &ClusterToken, side: Side, exporter: &[u8], got: &[u8]) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.expose());
    let mut msg = Vec::with_capacity(64 + exporter.len());
    msg.extend_from_slice(b"ringtune-control-proof-v1\0");
    msg.extend_from_slice(match side {
        Side::Node => b"node\0".as_slice(),
        Side::Coordinator => b"coordinator\0".as_slice(),
    });
    msg.extend_from_slice(exporter);
    hmac::verify(&key, &msg, got).is_ok()
}

/// 32 bytes of the QUIC connection's exported TLS keying material.
pub fn exporter(conn: &quinn::Connection) -> Result<Vec<u8>> {
    let mut out = vec![0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .map_err(|e| Error::Wire {
            peer: conn.remote_address().to_string(),
            reason: format!("exporting keying material: {e:?}"),
        })?;
    Ok(out)
}

/// A peer that sends nothing for this long (QUIC keeps idle connections alive every
/// [`CONTROL_KEEP_ALIVE`]) is gone: the connection fails on both ends.
pub const CONTROL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How often an idle control connection proves it is alive.
pub const CONTROL_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(1);

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        CONTROL_IDLE_TIMEOUT
            .try_into()
            .expect("10 s is a valid idle timeout"),
    ));
    t.keep_alive_interval(Some(CONTROL_KEEP_ALIVE));
    // One stream per node, opened by the node.
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    Arc::new(t)
}

fn quic_err(context: &str) -> impl Fn(String) -> Error + '_ {
    move |message| Error::Net {
        context: context.to_string(),
        message,
    }
}

/// The coordinator's QUIC endpoint on `addr`, not yet accepting: [`serve_quic`] installs
/// the per-run certificate once the driver has it.
pub fn bind_endpoint(addr: std::net::SocketAddr) -> Result<quinn::Endpoint> {
    quinn::Endpoint::client(addr).map_err(|e| Error::Net {
        context: format!("binding the coordinator's control address {addr} (UDP)"),
        message: e.to_string(),
    })
}

/// Makes `endpoint` accept nodes with the per-run certificate.
pub fn serve_quic(
    endpoint: &quinn::Endpoint,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<()> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_config(chain, key)?)
        .map_err(|e| quic_err("control-plane QUIC config")(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport());
    endpoint.set_server_config(Some(cfg));
    Ok(())
}

/// A node's QUIC client endpoint, bound to `local` (the address facing the coordinator),
/// checking the coordinator's certificate as `trust` says (rejections go to `rejected`).
pub fn client_endpoint(
    local: std::net::SocketAddr,
    trust: &ControlTrust,
    rejected: Rejections,
) -> Result<quinn::Endpoint> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_config(trust, rejected)?)
        .map_err(|e| quic_err("control-plane QUIC config")(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport());
    let mut ep = quinn::Endpoint::client(local).map_err(|e| Error::Net {
        context: format!("binding the node's control endpoint on {local}"),
        message: e.to_string(),
    })?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

fn bincode_opts() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_limit(MAX_CONTROL_FRAME as u64)
        .reject_trailing_bytes()
}

/// Writes one frame: a 4-byte little-endian length, then the bincode body.
pub async fn write_msg<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> std::io::Result<()> {
    use bincode::Options;
    let body = bincode_opts()
        .serialize(msg)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    if body.len() > MAX_CONTROL_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "control message of {} bytes is over the {MAX_CONTROL_FRAME}-byte limit",
                body.len()
            ),
        ));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame).await?;
    w.flush().await
}

/// What went wrong reading a frame.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the connection cleanly between frames.
    Closed,
    Io(std::io::Error),
    /// Over the size limit or not a valid message; the text says which.
    Bad(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Closed => write!(f, "connection closed"),
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::Bad(s) => write!(f, "{s}"),
        }
    }
}

/// Reads one frame; refuses a length over [`MAX_CONTROL_FRAME`] before allocating.
pub async fn read_msg<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> std::result::Result<T, ReadError> {
    use bincode::Options;
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ReadError::Closed),
        Err(e) => return Err(ReadError::Io(e)),
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_CONTROL_FRAME {
        return Err(ReadError::Bad(format!(
            "control frame of {n} bytes is over the {MAX_CONTROL_FRAME}-byte limit"
        )));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).await.map_err(ReadError::Io)?;
    bincode_opts()
        .deserialize(&body)
        .map_err(|e| ReadError::Bad(format!("malformed control message: {e}")))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The coordinator's TLS config: presents the per-run certificate, asks for no client
/// certificate (nodes prove the token instead).
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig> {
    let tls = |e: rustls::Error| Error::Net {
        context: "control-plane TLS config".into(),
        message: e.to_string(),
    };
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(tls)?;
    c.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
    Ok(c)
}

/// How a node checks the coordinator's certificate. The token proofs run in every case.
#[derive(Debug, Clone, Default)]
pub enum ControlTrust {
    /// Any certificate whose handshake signature is valid: the token proofs alone
    /// authenticate the session.
    #[default]
    TokenOnly,
    /// Exactly the certificate with this fingerprint.
    Fingerprint(Fingerprint),
    /// A chain to one of these roots, issued for the host the node dialed (`file`: where
    /// they came from, for messages).
    Ca {
        roots: Vec<CertificateDer<'static>>,
        file: String,
    },
}

impl ControlTrust {
    /// The CA roots in a PEM file.
    pub fn ca_file(path: &std::path::Path) -> Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let bad = |message: String| Error::Net {
            context: format!("the coordinator CA file {}", path.display()),
            message,
        };
        let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(e.to_string()))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
        if roots.is_empty() {
            return Err(bad("no certificate in the file".into()));
        }
        Ok(ControlTrust::Ca {
            roots,
            file: path.display().to_string(),
        })
    }

    /// The TLS server name to ask for when dialing `address` (`HOST:PORT`).
    pub fn server_name<'a>(&self, address: &'a str) -> &'a str {
        match self {
            ControlTrust::Ca { .. } => {
                let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
                host.trim_start_matches('[').trim_end_matches(']')
            }
            _ => CONTROL_SERVER_NAME,
        }
    }

    /// Whether [`Self::server_name`] of `address` is one TLS can check a certificate for:
    /// with a CA, the dialed host must be a DNS name or an IP address in its usual form
    /// (`127.1` is neither). Says why not.
    pub fn check_address(&self, address: &str) -> std::result::Result<(), String> {
        let name = self.server_name(address);
        match ServerName::try_from(name) {
            Ok(_) => Ok(()),
            Err(_) => Err(format!(
                "with a CA file the coordinator's certificate is checked for the host in \
                 {address}, and '{name}' is neither a DNS name nor an IP address in its usual \
                 form (write the host as the certificate names it)"
            )),
        }
    }
}

/// Why the verifier turned down the coordinator's certificate, in words, so a node can say
/// so and stop instead of retrying a handshake that will keep failing the same way.
pub type Rejections = Arc<std::sync::Mutex<Option<String>>>;

/// A node's TLS config: checks the coordinator's certificate as `trust` says; a rejection
/// is also written to `rejected`.
pub fn client_config(trust: &ControlTrust, rejected: Rejections) -> Result<rustls::ClientConfig> {
    let p = provider();
    let net = |e: String| Error::Net {
        context: "control-plane TLS config".into(),
        message: e,
    };
    let check = match trust {
        ControlTrust::TokenOnly => Check::Any,
        ControlTrust::Fingerprint(f) => Check::Fingerprint(*f),
        ControlTrust::Ca { roots, file } => {
            let mut store = rustls::RootCertStore::empty();
            for c in roots {
                store.add(c.clone()).map_err(|e| Error::Net {
                    context: format!("the coordinator CA file {file}"),
                    message: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(store),
                p.clone(),
            )
            .build()
            .map_err(|e| Error::Net {
                context: format!("the coordinator CA file {file}"),
                message: e.to_string(),
            })?;
            Check::Ca(v, file.clone())
        }
    };
    let mut c = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| net(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CoordinatorVerifier {
            provider: p,
            check,
            rejected,
        }))
        .with_no_client_auth();
    c.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
    Ok(c)
}

/// The server name a node's TLS client uses when it pins nothing or a fingerprint.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(CONTROL_SERVER_NAME).expect("a valid DNS name")
}

#[derive(Debug)]
enum Check {
    Any,
    Fingerprint(Fingerprint),
    Ca(Arc<rustls::client::WebPkiServerVerifier>, String),
}

/// Checks handshake signatures always, and the certificate as [`ControlTrust`] says.
#[derive(Debug)]
struct CoordinatorVerifier {
    provider: Arc<rustls::crypto::CryptoProvider>,
    check: Check,
    rejected: Rejections,
}

impl CoordinatorVerifier {
    fn reject(&self, why: String, err: rustls::Error) -> rustls::Error {
        *self.rejected.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        err
    }
}

impl ServerCertVerifier for CoordinatorVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match &self.check {
            Check::Any => Ok(ServerCertVerified::assertion()),
            Check::Fingerprint(want) => {
                let got = Fingerprint::of(end_entity);
                if got == *want {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(self.reject(
                        format!(
                            "its certificate is {got}, not the pinned {want} \
                             (--coordinator-fingerprint or RINGTUNE_COORDINATOR_FINGERPRINT): \
                             another process is listening there, or the coordinator was \
                             restarted and made a new certificate (its start-up line shows it; \
                             `ringtune coordinator --tls-cert/--tls-key` keeps one across \
                             restarts)"
                        ),
                        rustls::Error::InvalidCertificate(
                            rustls::CertificateError::ApplicationVerificationFailure,
                        ),
                    ))
                }
            }
            Check::Ca(v, file) => v
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map_err(|e| {
                    let name = match server_name {
                        ServerName::DnsName(d) => d.as_ref().to_string(),
                        ServerName::IpAddress(ip) => format!("{:?}", std::net::IpAddr::from(*ip)),
                        _ => "?".into(),
                    };
                    let hint = if e.to_string().contains("CaUsedAsEndEntity") {
                        " (it is a CA certificate itself, as a self-signed one made by \
                         `openssl req -x509` is: pin such a certificate with \
                         --coordinator-fingerprint instead)"
                    } else {
                        ""
                    };
                    self.reject(
                        format!(
                            "its certificate ({}) does not check out against the CA file \
                             {file} for the name {name}: {e}{hint}",
                            Fingerprint::of(end_entity)
                        ),
                        e,
                    )
                }),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_token_side_and_session() {
        let t = ClusterToken::new(b"0123456789abcdef".to_vec()).unwrap();
        let other = ClusterToken::new(b"0123456789abcdeX".to_vec()).unwrap();
        let p = proof(&t, Side::Node, b"session-a");
        assert!(verify(&t, Side::Node, b"session-a", &p));
        assert!(!verify(&other, Side::Node, b"session-a", &p));
        assert!(!verify(&t, Side::Coordinator, b"session-a", &p));
        assert!(!verify(&t, Side::Node, b"session-b", &p));
        assert!(!verify(&t, Side::Node, b"session-a", &p[..31]));
    }

    #[tokio::test]
    async fn frames_round_trip_and_oversized_is_refused_before_allocating() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let hello = NodeHello {
            version: CONTROL_VERSION,
            proof: vec![1, 2, 3],
        };
        write_msg(&mut a, &hello).await.unwrap();
        let back: NodeHello = read_msg(&mut b).await.unwrap();
        assert_eq!(back, hello);
        a.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        match read_msg::<_, NodeHello>(&mut b).await {
            Err(ReadError::Bad(s)) => assert!(s.contains("over the"), "{s}"),
            other => panic!("expected a size refusal, got {other:?}"),
        }
        drop(a);
        assert!(matches!(
            read_msg::<_, NodeHello>(&mut b).await,
            Err(ReadError::Closed)
        ));
    }
}
