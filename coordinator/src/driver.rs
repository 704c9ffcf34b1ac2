//! The tokio driver: feeds the sans-IO [`Coordinator`] from real connections and a real
//! clock, and carries its commands to the nodes.
//!
//! One task accepts TCP connections; per connection a task runs TLS, checks the node's
//! token proof ([`crate::wire`]), sends the [`Welcome`] and then reads [`NodeMsg`]s, and a
//! writer task sends [`Command`]s. All of them talk to the one loop in [`serve`] through a
//! channel, so the core is only ever touched from that loop. The loop sleeps until the
//! core's `poll_timeout`, the next input, or an interrupt (Ctrl-C / SIGTERM, passed in
//! as a watch channel), whichever comes first — so heartbeats, step and stop timeouts fire
//! on time even when no node says anything.
//!
//! Events go out on a channel for the caller to display and record (metrics.jsonl, the
//! progress bar); the driver itself writes no files.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ringtune_collectives::auth::ClusterToken;
use ringtune_collectives::tls::ClusterIdentity;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant as TokioInstant;

use crate::core::{Auth, Coordinator, Event, Outcome};
use crate::error::Result;
use crate::ids::NodeId;
use crate::msg::{Command, NodeMsg, Refusal};
use crate::wire::{self, CoordHello, NodeHello, Side, Welcome};

/// How long a new connection may take for TLS and its hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the last commands (Stop, refusals) get to reach the nodes once the run is over.
const FLUSH_GRACE: Duration = Duration::from_millis(300);

/// What the driver needs besides the core.
pub struct DriverConfig {
    /// Nodes must prove this token.
    pub token: ClusterToken,
    /// The control plane's server certificate and key (per run, or an operator's); nodes
    /// may pin it. Its key never leaves the coordinator.
    pub control: ClusterIdentity,
    /// The per-run ring certificate and key, handed to every node in the welcome.
    pub ring: ClusterIdentity,
    /// The effective run config as JSON, for the welcome.
    pub run_config_json: String,
}

enum Input {
    /// A connection finished its handshake (`tx`: where its commands go).
    Connected {
        id: NodeId,
        auth: Auth,
        tx: Option<mpsc::UnboundedSender<Command>>,
    },
    Msg(NodeId, NodeMsg),
    Closed(NodeId),
}

/// Binds the control-plane endpoint (UDP; separate from [`serve`] so a caller can learn
/// the port before nodes are started, e.g. with port 0).
pub fn bind(addr: SocketAddr) -> Result<quinn::Endpoint> {
    wire::bind_endpoint(addr)
}

/// Runs `core` to its end: accepts nodes on `listener`, forwards events to `events`, turns
/// a `true` on `interrupt` into the core's interrupt and a `(host, local_rank)` on `exits`
/// (a launcher that saw that node's process end) into the core's process exit. Returns
/// the run's outcome.
pub async fn serve(
    mut core: Coordinator,
    endpoint: quinn::Endpoint,
    cfg: DriverConfig,
    events: mpsc::UnboundedSender<Event>,
    mut interrupt: watch::Receiver<bool>,
    mut exits: mpsc::UnboundedReceiver<(String, u32)>,
) -> Result<Outcome> {
    wire::serve_quic(
        &endpoint,
        cfg.control.cert_chain.clone(),
        cfg.control.key.clone_key(),
    )?;
    let welcome = Arc::new(Welcome {
        proof: Vec::new(),
        run_config_json: cfg.run_config_json,
        ring_cert_chain: cfg.ring.cert_chain.iter().map(|c| c.to_vec()).collect(),
        ring_key: cfg.ring.key.secret_der().to_vec(),
    });
    let token = cfg.token;
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Input>();

    let accept_tx = in_tx.clone();
    let tls_events = events.clone();
    let accept_ep = endpoint.clone();
    let accept = tokio::spawn(async move {
        let mut next = 0u64;
        while let Some(incoming) = accept_ep.accept().await {
            next += 1;
            tokio::spawn(connection(
                incoming,
                NodeId(next),
                token.clone(),
                Arc::clone(&welcome),
                accept_tx.clone(),
                tls_events.clone(),
            ));
        }
    });

    let mut conns: BTreeMap<NodeId, mpsc::UnboundedSender<Command>> = BTreeMap::new();
    let mut interrupted = *interrupt.borrow();
    let mut exits_open = true;
    if interrupted {
        core.handle_interrupt(std::time::Instant::now());
    }
    let outcome = loop {
        while let Some(out) = core.poll_command() {
            let closes = matches!(
                out.command,
                Command::Refused(_) | Command::Disconnect { .. }
            );
            if let Some(tx) = conns.get(&out.to) {
                let _ = tx.send(out.command);
            }
            if closes {
                // Dropping the sender ends the writer after it has sent what is queued.
                conns.remove(&out.to);
            }
        }
        let mut finished = None;
        while let Some(ev) = core.poll_event() {
            if let Event::StopTimedOut { unacked } = &ev {
                for n in unacked {
                    conns.remove(n);
                }
            }
            if let Event::Finished(o) = &ev {
                finished = Some(o.clone());
            }
            let _ = events.send(ev);
        }
        if let Some(o) = finished {
            break o;
        }
        let sleep_until = core
            .poll_timeout()
            .map(TokioInstant::from_std)
            .unwrap_or_else(|| TokioInstant::now() + Duration::from_secs(3600));
        tokio::select! {
            input = in_rx.recv() => {
                let now = std::time::Instant::now();
                match input {
                    Some(Input::Connected { id, auth, tx }) => {
                        if let Some(tx) = tx {
                            conns.insert(id, tx);
                        }
                        core.handle_connect(now, id, auth);
                    }
                    Some(Input::Msg(id, msg)) => core.handle_message(now, id, msg),
                    Some(Input::Closed(id)) => {
                        conns.remove(&id);
                        if core.is_connected(id) {
                            core.handle_disconnect(now, id);
                        }
                    }
                    // Unreachable while the accept task holds a sender.
                    None => core.handle_interrupt(now),
                }
            }
            _ = tokio::time::sleep_until(sleep_until) => {
                core.handle_timeout(std::time::Instant::now());
            }
            exit = exits.recv(), if exits_open => match exit {
                Some((host, slot)) => {
                    core.handle_process_exit(std::time::Instant::now(), &host, slot)
                }
                None => exits_open = false,
            },
            changed = interrupt.changed(), if !interrupted => {
                if changed.is_err() || *interrupt.borrow() {
                    interrupted = true;
                    core.handle_interrupt(std::time::Instant::now());
                }
            }
        }
    };
    accept.abort();
    // Let the writers deliver the final Stop / Disconnect.
    drop(conns);
    tokio::time::sleep(FLUSH_GRACE).await;
    Ok(outcome)
}

/// One node's connection: QUIC handshake, the node's stream, token proof, welcome, then a
/// reader loop and a writer task.
async fn connection(
    incoming: quinn::Incoming,
    id: NodeId,
    token: ClusterToken,
    welcome: Arc<Welcome>,
    inputs: mpsc::UnboundedSender<Input>,
    events: mpsc::UnboundedSender<Event>,
) {
    let peer = incoming.remote_address();
    let handshake = async {
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                // Said here, not to the core: no node got as far as a hello.
                let _ = events.send(Event::HandshakeFailed {
                    peer: peer.to_string(),
                    reason: e.to_string(),
                });
                return Err(e.to_string());
            }
        };
        let exporter = wire::exporter(&conn).map_err(|e| e.to_string())?;
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let hello: NodeHello = wire::read_msg(&mut recv).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((conn, send, recv, exporter, hello))
    };
    let (conn, mut wr, mut rd, exporter, hello) =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(x)) => x,
            // Not a node that got as far as a hello: nothing for the core to hear about.
            Ok(Err(_)) | Err(_) => return,
        };
    if hello.version != wire::CONTROL_VERSION
        || !wire::verify(&token, Side::Node, &exporter, &hello.proof)
    {
        let _ = wire::write_msg(&mut wr, &CoordHello::Refused(Refusal::BadToken)).await;
        let _ = inputs.send(Input::Connected {
            id,
            auth: Auth::TokenRejected,
            tx: None,
        });
        let _ = inputs.send(Input::Closed(id));
        close_after_flush(conn, wr).await;
        return;
    }
    let mut w = (*welcome).clone();
    w.proof = wire::proof(&token, Side::Coordinator, &exporter);
    if wire::write_msg(&mut wr, &CoordHello::Welcome(w))
        .await
        .is_err()
    {
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Command>();
    if inputs
        .send(Input::Connected {
            id,
            auth: Auth::TokenVerified,
            tx: Some(tx),
        })
        .is_err()
    {
        return;
    }
    let writer_conn = conn.clone();
    let writer = tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            if wire::write_msg(&mut wr, &cmd).await.is_err() {
                break;
            }
        }
        // The core closed this connection (refusal, disconnect, end of run).
        close_after_flush(writer_conn, wr).await;
    });
    while let Ok(msg) = wire::read_msg::<_, NodeMsg>(&mut rd).await {
        if inputs.send(Input::Msg(id, msg)).is_err() {
            break;
        }
    }
    let _ = inputs.send(Input::Closed(id));
    let _ = writer.await;
}

/// Finishes the stream and closes the connection once the node has it all (or after
/// [`FLUSH_GRACE`]): closing a QUIC connection at once would drop what is still in flight,
/// such as the final `Stop`.
async fn close_after_flush(conn: quinn::Connection, mut wr: quinn::SendStream) {
    let _ = wr.finish();
    let _ = tokio::time::timeout(FLUSH_GRACE, wr.stopped()).await;
    conn.close(0u32.into(), b"done");
}
