//! QUIC links (quinn): one endpoint accepts the left neighbour, a second one dials the right
//! neighbour, so the two links' packets are handled by separate sockets and driver tasks.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, VarInt};
use tokio::time::{timeout_at, Instant};

use crate::auth::EXPORTER_LABEL;
use crate::error::{Error, Result};
use crate::net::{client_handshake, link_err, server_handshake, Established, NetConfig, Sink};
use crate::ring::RingConfig;
use crate::tls::CLUSTER_SERVER_NAME;

/// Largest UDP payload we allow quinn to use. Loopback's MTU is 64 KiB, and fewer, larger
/// packets mean fewer syscalls and less per-packet work; on real links MTU discovery stops
/// at what the path carries.
const MAX_UDP_PAYLOAD: u16 = 65_000;

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Windows far above one chunk so flow control never idles a link between frames.
    t.stream_receive_window(VarInt::from_u32(64 << 20));
    t.receive_window(VarInt::from_u32(256 << 20));
    t.send_window(256 << 20);
    t.max_concurrent_bidi_streams(4u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(Some(
        Duration::from_secs(30)
            .try_into()
            .expect("30 s is a valid idle timeout"),
    ));
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.initial_rtt(Duration::from_millis(20));
    // Path MTU: discovered (up to 64 KiB on loopback), or fixed by RINGTUNE_QUIC_MTU.
    // Fixing it high on loopback did not help in measurements: drops while a receiver is
    // descheduled look like a black hole and quinn falls back to 1200-byte packets.
    match std::env::var("RINGTUNE_QUIC_MTU")
        .ok()
        .and_then(|v| v.parse::<u16>().ok())
    {
        Some(m) => {
            t.initial_mtu(m);
            t.mtu_discovery_config(None);
        }
        None => {
            let mut mtu = quinn::MtuDiscoveryConfig::default();
            mtu.upper_bound(MAX_UDP_PAYLOAD);
            t.mtu_discovery_config(Some(mtu));
        }
    }
    // Congestion control: start with a large window (loopback and datacentre links), Cubic
    // by default. RINGTUNE_QUIC_CC=cubic|newreno|bbr and RINGTUNE_QUIC_WINDOW (bytes) are
    // tuning knobs; none of them changed throughput measurably on the 2-core test host,
    // where QUIC is limited by per-packet CPU work (see README, Collectives).
    let window: u64 = std::env::var("RINGTUNE_QUIC_WINDOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32 << 20);
    match std::env::var("RINGTUNE_QUIC_CC").as_deref() {
        Ok("newreno") => {
            let mut c = quinn::congestion::NewRenoConfig::default();
            c.initial_window(window);
            t.congestion_controller_factory(Arc::new(c));
        }
        Ok("bbr") => {
            let mut c = quinn::congestion::BbrConfig::default();
            c.initial_window(window);
            t.congestion_controller_factory(Arc::new(c));
        }
        _ => {
            let mut c = quinn::congestion::CubicConfig::default();
            c.initial_window(window);
            t.congestion_controller_factory(Arc::new(c));
        }
    }
    t
}

fn udp_socket(addr: SocketAddr) -> Result<UdpSocket> {
    let sock = UdpSocket::bind(addr).map_err(|source| Error::Io {
        context: format!("binding UDP {addr}"),
        source,
    })?;
    tune_udp(sock)
}

/// The ring's listening socket: a duplicate of the one the caller reserved at
/// `cfg.listen`, or a fresh bind there.
fn listen_socket(cfg: &NetConfig) -> Result<UdpSocket> {
    match cfg.reserved.as_deref() {
        Some(crate::net::ReservedPort::Udp(s)) => {
            let dup = s.try_clone().map_err(|source| Error::Io {
                context: format!("using the reserved UDP socket {}", cfg.listen),
                source,
            })?;
            tune_udp(dup)
        }
        _ => udp_socket(cfg.listen),
    }
}

fn tune_udp(sock: UdpSocket) -> Result<UdpSocket> {
    // Bursts of 64 KiB datagrams overflow the default ~200 KiB socket buffers.
    let s = socket2::SockRef::from(&sock);
    let _ = s.set_recv_buffer_size(16 << 20);
    let _ = s.set_send_buffer_size(16 << 20);
    force_recv_buffer(&sock, 64 << 20);
    Ok(sock)
}

/// Past net.core.rmem_max where we are allowed to (CAP_NET_ADMIN): a receiver that is
/// descheduled for a few milliseconds otherwise drops datagrams, and every drop costs a
/// retransmission and a congestion event. Silently keeps the normal size otherwise.
#[cfg(target_os = "linux")]
fn force_recv_buffer(sock: &UdpSocket, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain setsockopt on a socket we own, with a correctly sized int argument.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &bytes as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn force_recv_buffer(_: &UdpSocket, _: i32) {}

pub(crate) async fn establish(cfg: &NetConfig, ring: &RingConfig) -> Result<Established> {
    let cred = |e: &dyn std::fmt::Display| Error::Credentials(e.to_string());
    let transport = Arc::new(transport_config());
    let mut ep_cfg = quinn::EndpointConfig::default();
    ep_cfg
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| cred(&e))?;
    let runtime = Arc::new(quinn::TokioRuntime);

    let server_crypto =
        QuicServerConfig::try_from(cfg.identity.server_config()?).map_err(|e| cred(&e))?;
    let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server_cfg.transport_config(transport.clone());
    let server = quinn::Endpoint::new(
        ep_cfg.clone(),
        Some(server_cfg),
        listen_socket(cfg)?,
        runtime.clone(),
    )
    .map_err(|source| Error::Io {
        context: format!("starting QUIC endpoint on {}", cfg.listen),
        source,
    })?;

    let client_crypto =
        QuicClientConfig::try_from(cfg.identity.client_config()?).map_err(|e| cred(&e))?;
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(client_crypto));
    client_cfg.transport_config(transport);
    let mut client = quinn::Endpoint::new(
        ep_cfg,
        None,
        udp_socket(SocketAddr::new(cfg.listen.ip(), 0))?,
        runtime,
    )
    .map_err(|source| Error::Io {
        context: "starting QUIC client endpoint".into(),
        source,
    })?;
    client.set_default_client_config(client_cfg);

    let deadline = Instant::now() + cfg.connect_timeout;
    let (accepted, dialled) = tokio::join!(
        accept(&server, cfg, ring, deadline),
        dial(&client, cfg, ring, deadline)
    );
    // The dialling side's error carries the peer's refusal reason: report it first.
    let (out_conn, (out_send, _out_recv)) = dialled?;
    let (in_conn, (_in_send, in_recv)) = accepted?;
    Ok(Established {
        sink: Sink::Quic(out_send),
        source: Box::new(in_recv),
        keep: vec![
            Box::new(_in_send),
            Box::new(_out_recv),
            Box::new(in_conn),
            Box::new(out_conn),
            Box::new(server),
            Box::new(client),
        ],
    })
}

type Link = (quinn::Connection, (quinn::SendStream, quinn::RecvStream));

async fn accept(
    server: &quinn::Endpoint,
    cfg: &NetConfig,
    ring: &RingConfig,
    deadline: Instant,
) -> Result<Link> {
    let left = ring.left();
    loop {
        let incoming = match timeout_at(deadline, server.accept()).await {
            Ok(Some(i)) => i,
            Ok(None) => {
                return Err(link_err(
                    ring,
                    format!("rank {left}"),
                    "endpoint closed while accepting",
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
        let addr = incoming.remote_address();
        let per_try = deadline.min(Instant::now() + Duration::from_secs(10));
        let attempt = async {
            let conn = incoming
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            let (send, recv) = conn
                .accept_bi()
                .await
                .map_err(|e| format!("no stream opened: {e}"))?;
            let mut ex = [0u8; 32];
            conn.export_keying_material(&mut ex, EXPORTER_LABEL, b"")
                .map_err(|_| "TLS exporter unavailable".to_string())?;
            let mut s = tokio::io::join(recv, send);
            if let Err(reason) = server_handshake(&mut s, &ex, ring, &cfg.token).await {
                // Let the refusal reach the peer before the connection goes away.
                let (_, mut send) = s.into_inner();
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
                conn.close(1u32.into(), b"refused");
                return Err(reason);
            }
            let (recv, send) = s.into_inner();
            Ok::<_, String>((conn, (send, recv)))
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

async fn dial(
    client: &quinn::Endpoint,
    cfg: &NetConfig,
    ring: &RingConfig,
    deadline: Instant,
) -> Result<Link> {
    let right = ring.right();
    let addr = cfg.peers[right.idx()];
    let peer = format!("rank {right} at {addr}");
    loop {
        let connecting = client
            .connect(addr, CLUSTER_SERVER_NAME)
            .map_err(|e| link_err(ring, &peer, format!("cannot connect: {e}")))?;
        let conn = match timeout_at(deadline, connecting).await {
            Err(_) => {
                return Err(link_err(
                    ring,
                    &peer,
                    format!("no connection within {:?}", cfg.connect_timeout),
                ))
            }
            // Nobody answered yet (the peer may still be starting): try again.
            Ok(Err(ConnectionError::TimedOut)) if Instant::now() < deadline => continue,
            Ok(Err(e)) => {
                return Err(link_err(
                    ring,
                    &peer,
                    format!("QUIC/TLS handshake failed: {e}"),
                ))
            }
            Ok(Ok(c)) => c,
        };
        let attempt = async {
            let (send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| format!("opening stream: {e}"))?;
            let mut ex = [0u8; 32];
            conn.export_keying_material(&mut ex, EXPORTER_LABEL, b"")
                .map_err(|_| "TLS exporter unavailable".to_string())?;
            let mut s = tokio::io::join(recv, send);
            client_handshake(&mut s, &ex, ring, &cfg.token).await?;
            let (recv, send) = s.into_inner();
            Ok::<_, String>((send, recv))
        };
        return match timeout_at(deadline, attempt).await {
            Ok(Ok(streams)) => Ok((conn, streams)),
            Ok(Err(reason)) => Err(link_err(ring, &peer, reason)),
            Err(_) => Err(link_err(ring, &peer, "handshake timed out")),
        };
    }
}
