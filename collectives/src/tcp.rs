//! TCP + TLS 1.3 links (tokio-rustls), same handshake and framing as QUIC.
//!
//! On one host (and on fast, clean networks) this is the faster transport: segmentation,
//! acknowledgement and retransmission stay in the kernel, and TLS works on 16 KiB records
//! rather than per-datagram packets.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::auth::EXPORTER_LABEL;
use crate::error::{Error, Result};
use crate::net::{client_handshake, link_err, server_handshake, Established, NetConfig, Sink};
use crate::ring::RingConfig;
use crate::tls::CLUSTER_SERVER_NAME;

pub(crate) async fn establish(cfg: &NetConfig, ring: &RingConfig) -> Result<Established> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| Error::Io {
            context: format!("binding TCP {}", cfg.listen),
            source,
        })?;
    let acceptor = TlsAcceptor::from(Arc::new(cfg.identity.server_config()?));
    let connector = TlsConnector::from(Arc::new(cfg.identity.client_config()?));
    let deadline = Instant::now() + cfg.connect_timeout;
    let (accepted, dialled) = tokio::join!(
        accept(&listener, &acceptor, cfg, ring, deadline),
        dial(&connector, cfg, ring, deadline)
    );
    // The dialling side's error carries the peer's refusal reason: report it first.
    let sink = Sink::Stream(Box::new(dialled?));
    Ok(Established {
        sink,
        source: Box::new(accepted?),
        keep: Vec::new(),
    })
}

fn tune(sock: &TcpStream) {
    let _ = sock.set_nodelay(true);
    let s = socket2::SockRef::from(sock);
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
}

async fn accept(
    listener: &TcpListener,
    acceptor: &TlsAcceptor,
    cfg: &NetConfig,
    ring: &RingConfig,
    deadline: Instant,
) -> Result<tokio_rustls::server::TlsStream<tokio::io::BufReader<TcpStream>>> {
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
            // rustls reads the socket 4 KiB at a time; a large user-space buffer below it
            // turns that into one syscall per 256 KiB.
            let sock = tokio::io::BufReader::with_capacity(256 << 10, sock);
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
            Ok::<_, String>(tls)
        };
        match timeout_at(per_try, attempt).await {
            Ok(Ok(tls)) => return Ok(tls),
            Ok(Err(reason)) => {
                tracing::warn!(rank = ring.rank.0, peer = %addr, "refused ring link: {reason}")
            }
            Err(_) => {
                tracing::warn!(rank = ring.rank.0, peer = %addr, "refused ring link: handshake timed out")
            }
        }
    }
}

async fn dial(
    connector: &TlsConnector,
    cfg: &NetConfig,
    ring: &RingConfig,
    deadline: Instant,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let right = ring.right();
    let addr = cfg.peers[right.idx()];
    let peer = format!("rank {right} at {addr}");
    let sock = loop {
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
    let name = ServerName::try_from(CLUSTER_SERVER_NAME).expect("static server name is valid");
    let attempt = async {
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
        Ok::<_, String>(tls)
    };
    match timeout_at(deadline, attempt).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(reason)) => Err(link_err(ring, &peer, reason)),
        Err(_) => Err(link_err(ring, &peer, "handshake timed out")),
    }
}
