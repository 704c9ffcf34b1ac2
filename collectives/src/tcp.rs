//! TCP links, authenticated two ways, both handing over plain `std` sockets for the
//! threaded data path ([`crate::stream`]):
//!
//! - `tcp-tls` ([`Transport::TcpTls`]): mutual TLS 1.3 (tokio-rustls) with the pinned
//!   cluster certificate, the token proof over the TLS session, then the socket leaves rustls
//!   and frames are sealed with AES-128-GCM under keys exported from that session.
//! - `tcp-plain` ([`Transport::TcpPlain`], for trusted networks only): no encryption and no
//!   certificate. Each end sends a fresh 32-byte random nonce, and the token proof is
//!   bound to both nonces instead of a TLS exporter: a challenge–response, so a recorded
//!   proof is useless on another connection and the token never crosses the wire. After
//!   that, anyone on the path can read and alter the gradients.
//!
//! On one host (and on fast, clean networks) TCP is the faster transport: segmentation,
//! acknowledgement and retransmission stay in the kernel.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::auth::EXPORTER_LABEL;
use crate::error::{Error, Result};
use crate::net::{client_handshake, link_err, server_handshake, NetConfig, Transport};
use crate::ring::RingConfig;
use crate::stream::{FrameKey, StreamLinks, FRAME_KEY_LABEL};
use crate::tls::CLUSTER_SERVER_NAME;

/// Bytes of each end's challenge nonce on a `tcp-plain` link.
const NONCE_LEN: usize = 32;
/// Prefix of what a `tcp-plain` token proof is bound to.
const PLAIN_BINDING_LABEL: &[u8] = b"ringtune-tcp-plain-nonces-v1";

/// An authenticated link before it is handed to the data path.
struct Link {
    sock: TcpStream,
    key: Option<FrameKey>,
}

/// How both ends of a link authenticate.
enum Auth {
    Tls {
        acceptor: TlsAcceptor,
        connector: TlsConnector,
    },
    Plain,
}

pub(crate) async fn establish(cfg: &NetConfig, ring: &RingConfig) -> Result<StreamLinks> {
    let listener = match cfg.reserved.as_deref() {
        // A duplicate of the listener the caller reserved at `cfg.listen`.
        Some(crate::net::ReservedPort::Tcp(l)) => l
            .try_clone()
            .and_then(|l| {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            })
            .map_err(|source| Error::Io {
                context: format!("using the reserved TCP listener {}", cfg.listen),
                source,
            })?,
        _ => TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| Error::Io {
                context: format!("binding TCP {}", cfg.listen),
                source,
            })?,
    };
    let auth = match cfg.transport {
        Transport::TcpPlain => Auth::Plain,
        _ => Auth::Tls {
            acceptor: TlsAcceptor::from(Arc::new(cfg.identity.server_config()?)),
            connector: TlsConnector::from(Arc::new(cfg.identity.client_config()?)),
        },
    };
    let deadline = Instant::now() + cfg.connect_timeout;
    let (accepted, dialled) = tokio::join!(
        accept(&listener, &auth, cfg, ring, deadline),
        dial(&auth, cfg, ring, deadline)
    );
    // The dialling side's error carries the peer's refusal reason: report it first.
    let out = dialled?;
    let inp = accepted?;
    let to_std = |l: Link, what: &str| -> Result<(std::net::TcpStream, Option<FrameKey>)> {
        let s = l.sock.into_std().and_then(|s| {
            s.set_nonblocking(false)?;
            Ok(s)
        });
        let s = s.map_err(|source| Error::Io {
            context: format!("handing the {what} link to its thread"),
            source,
        })?;
        Ok((s, l.key))
    };
    let (out, seal) = to_std(out, "outgoing")?;
    let (inp, open) = to_std(inp, "incoming")?;
    let keys = match (seal, open) {
        (Some(s), Some(o)) => Some((s, o)),
        _ => None,
    };
    Ok(StreamLinks { out, inp, keys })
}

/// The frame key of one TLS session, from its exporter (the same on both ends).
fn frame_key(
    exported: std::result::Result<[u8; 32], rustls::Error>,
) -> std::result::Result<FrameKey, String> {
    exported
        .map(FrameKey::new)
        .map_err(|e| format!("TLS exporter: {e}"))
}

/// Sends our nonce and reads the peer's (both ends do both, so nobody waits on the other).
async fn swap_nonces<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> std::result::Result<([u8; NONCE_LEN], [u8; NONCE_LEN]), String> {
    use ring::rand::SecureRandom;
    let mut mine = [0u8; NONCE_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut mine)
        .map_err(|_| "no system randomness for a nonce".to_string())?;
    s.write_all(&mine)
        .await
        .map_err(|e| format!("sending nonce: {e}"))?;
    let mut theirs = [0u8; NONCE_LEN];
    s.read_exact(&mut theirs)
        .await
        .map_err(|e| format!("reading nonce: {e}"))?;
    Ok((mine, theirs))
}

/// What a `tcp-plain` proof is bound to: both nonces, the connector's first.
fn plain_binding(connector: &[u8; NONCE_LEN], acceptor: &[u8; NONCE_LEN]) -> Vec<u8> {
    [PLAIN_BINDING_LABEL, connector, acceptor].concat()
}

fn tune(sock: &TcpStream) {
    let _ = sock.set_nodelay(true);
    let s = socket2::SockRef::from(sock);
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
}

async fn accept(
    listener: &TcpListener,
    auth: &Auth,
    cfg: &NetConfig,
    ring: &RingConfig,
    deadline: Instant,
) -> Result<Link> {
    let left = ring.left();
    loop {
        let (sock, addr) = match timeout_at(deadline, listener.accept()).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                return Err(link_err(
                    ring,
                    format!("rank {left}"),
                    format!("accept failed: {e}"),
                ))
            }
            Err(_) => {
                return Err(link_err(
                    ring,
                    format!("rank {left}"),
                    format!(
                        "no authenticated connection within {:?}",
                        cfg.connect_timeout
                    ),
                ))
            }
        };
        tune(&sock);
        let per_try = deadline.min(Instant::now() + Duration::from_secs(10));
        let attempt = async {
            match auth {
                Auth::Tls { acceptor, .. } => {
                    let mut tls = acceptor
                        .accept(sock)
                        .await
                        .map_err(|e| format!("TLS handshake failed: {e}"))?;
                    let ex = tls
                        .get_ref()
                        .1
                        .export_keying_material([0u8; 32], EXPORTER_LABEL, Some(b""))
                        .map_err(|e| format!("TLS exporter: {e}"))?;
                    server_handshake(&mut tls, &ex, ring, &cfg.token).await?;
                    let key = frame_key(tls.get_ref().1.export_keying_material(
                        [0u8; 32],
                        FRAME_KEY_LABEL,
                        None,
                    ))?;
                    // The peer sends data only after our reply, which we have just sent, so
                    // rustls holds nothing of it: the socket continues at the first frame.
                    let (sock, _) = tls.into_inner();
                    Ok::<_, String>(Link {
                        sock,
                        key: Some(key),
                    })
                }
                Auth::Plain => {
                    let mut sock = sock;
                    let (mine, theirs) = swap_nonces(&mut sock).await?;
                    server_handshake(&mut sock, &plain_binding(&theirs, &mine), ring, &cfg.token)
                        .await?;
                    Ok(Link { sock, key: None })
                }
            }
        };
        match timeout_at(per_try, attempt).await {
            Ok(Ok(link)) => return Ok(link),
            Ok(Err(reason)) => {
                tracing::warn!(rank = ring.rank.0, peer = %addr, "refused ring link: {reason}")
            }
            Err(_) => {
                tracing::warn!(rank = ring.rank.0, peer = %addr, "refused ring link: handshake timed out")
            }
        }
    }
}

async fn dial(auth: &Auth, cfg: &NetConfig, ring: &RingConfig, deadline: Instant) -> Result<Link> {
    let right = ring.right();
    let addr = cfg.peers[right.idx()];
    let peer = format!("rank {right} at {addr}");
    let mut sock = loop {
        match timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => break s,
            // The peer may not be listening yet.
            Ok(Err(_)) if Instant::now() + Duration::from_millis(20) < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Ok(Err(e)) => return Err(link_err(ring, &peer, format!("cannot connect: {e}"))),
            Err(_) => {
                return Err(link_err(
                    ring,
                    &peer,
                    format!("no connection within {:?}", cfg.connect_timeout),
                ))
            }
        }
    };
    tune(&sock);
    let attempt = async {
        match auth {
            Auth::Tls { connector, .. } => {
                let name =
                    ServerName::try_from(CLUSTER_SERVER_NAME).expect("static server name is valid");
                let mut tls = connector
                    .connect(name, sock)
                    .await
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                let ex = tls
                    .get_ref()
                    .1
                    .export_keying_material([0u8; 32], EXPORTER_LABEL, Some(b""))
                    .map_err(|e| format!("TLS exporter: {e}"))?;
                client_handshake(&mut tls, &ex, ring, &cfg.token).await?;
                let key = frame_key(tls.get_ref().1.export_keying_material(
                    [0u8; 32],
                    FRAME_KEY_LABEL,
                    None,
                ))?;
                // The acceptor writes nothing after its reply (its session tickets came
                // before it), so rustls holds no unread bytes of this socket.
                let (sock, _) = tls.into_inner();
                Ok::<_, String>(Link {
                    sock,
                    key: Some(key),
                })
            }
            Auth::Plain => {
                let (mine, theirs) = swap_nonces(&mut sock).await?;
                client_handshake(&mut sock, &plain_binding(&mine, &theirs), ring, &cfg.token)
                    .await?;
                Ok(Link { sock, key: None })
            }
        }
    };
    match timeout_at(deadline, attempt).await {
        Ok(Ok(link)) => Ok(link),
        Ok(Err(reason)) => Err(link_err(ring, &peer, reason)),
        Err(_) => Err(link_err(ring, &peer, "handshake timed out")),
    }
}
